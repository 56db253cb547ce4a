//! Operations (issue 5, DESIGN §3.3–§3.6, §4.3 row 5, §4.4, §6): reload by SIGHUP and by a
//! file change, rate limits, `/metrics`, expired connectors, `check` findings, SIGTERM during
//! a slow call, and revocations surviving a restart. Several tests run the real binary as a
//! child process, so signals and restarts are the real thing.

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::Notify;

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_credbroker");
const ISSUES: &str = "/github/repos/acme/widget/issues";

// ---------------------------------------------------------------------------------------
// helpers: the broker as a child process, plain HTTP calls to any address

/// `credbroker serve` running as a child process; killed on drop if still running.
struct ChildBroker {
    child: Child,
    proxy: SocketAddr,
    admin: SocketAddr,
}

impl ChildBroker {
    /// Starts the binary and waits for the two "listening on" lines it prints.
    fn spawn(config: &Path) -> Self {
        let mut serve = Command::new(BIN);
        serve.args(["serve", "--config", config.to_str().unwrap()]);
        Self::spawn_command(serve)
    }

    /// Like `spawn`, with the soft open-file limit lowered to `limit` first (as a service
    /// manager's default of 1024 would be).
    fn spawn_with_soft_open_files(config: &Path, limit: u64) -> Self {
        let mut sh = Command::new("sh");
        sh.args([
            "-c",
            &format!("ulimit -Sn {limit} && exec \"$0\" serve --config \"$1\""),
            BIN,
            config.to_str().unwrap(),
        ]);
        Self::spawn_command(sh)
    }

    fn spawn_command(command: Command) -> Self {
        Self::spawn_logging(command, "warn", false)
    }

    /// With `RUST_LOG=log`; with `hang_up`, the reader of the broker's stderr goes away once
    /// the broker has said where it listens (a log shipper that died).
    fn spawn_logging(mut command: Command, log: &str, hang_up: bool) -> Self {
        let mut child = command
            .env("RUST_LOG", log)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        // Keeps draining stderr for the child's whole life, so it never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut addresses = 0;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                addresses += usize::from(line.contains(" listening on "));
                let _ = tx.send(line);
                if hang_up && addresses == 2 {
                    break;
                }
            }
        });
        let (mut proxy, mut admin) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(30);
        while proxy.is_none() || admin.is_none() {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("the broker printed its addresses");
            if let Some(a) = line.strip_prefix("credbroker listening on ") {
                proxy = a.trim().parse().ok();
            } else if let Some(a) = line.strip_prefix("admin listening on ") {
                admin = a.trim().parse().ok();
            }
        }
        Self {
            child,
            proxy: proxy.unwrap(),
            admin: admin.unwrap(),
        }
    }

    fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name}");
    }

    /// Waits for the process to exit (without blocking the test's runtime).
    async fn exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the broker did not exit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(mut self) {
        self.signal("TERM");
        assert_eq!(self.exit().await.code(), Some(0));
    }
}

impl Drop for ChildBroker {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

async fn token_at(addr: SocketAddr, scope: &str) -> String {
    token_with_at(addr, scope, &[]).await
}

async fn token_with_at(addr: SocketAddr, scope: &str, extra: &[(&str, &str)]) -> String {
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("bot:{SECRET}"));
    let mut form = vec![("grant_type", "client_credentials"), ("scope", scope)];
    form.extend_from_slice(extra);
    let req = Request::post("/oauth2/token")
        .header("authorization", format!("Basic {basic}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form_encode(&form))
        .unwrap();
    let (status, _, body) = send(addr, req).await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["access_token"].as_str().unwrap().to_owned()
}

async fn get_at(addr: SocketAddr, target: &str, token: &str) -> (u16, String) {
    let req = Request::get(target)
        .header("authorization", format!("Bearer {token}"))
        .body(String::new())
        .unwrap();
    let (status, _, body) = send(addr, req).await;
    (status, body)
}

async fn admin_at(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .body(body.to_owned())
        .unwrap();
    let (status, _, body) = send(addr, req).await;
    (status, body)
}

/// Polls `probe` until it returns true; real file-system events and signals have no fake
/// clock, so the test waits for the effect (bounded) instead of for a fixed time.
async fn eventually<F, Fut>(what: &str, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !probe().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The standard config without `issues.read` in bot's grant.
fn narrowed(config: &str) -> String {
    let out = config.replace(
        "operations = [\"issues.read\", \"issues.comment\"]",
        "operations = [\"issues.comment\"]",
    );
    assert_ne!(out, config);
    out
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("credbroker.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Adds a persistent signing key (made by the binary) so tokens outlive a restart.
fn with_signing_key(dir: &Path, config: &str) -> String {
    keygen_signing_key(dir);
    let out = config.replace(
        "issuer = \"credbroker-test\"",
        "issuer = \"credbroker-test\"\nsigning_key = \"signing.pem\"",
    );
    assert_ne!(out, config);
    out
}

fn admin_records<'a>(records: &'a [serde_json::Value], actor: &str) -> Vec<&'a serde_json::Value> {
    events(records, "admin")
        .into_iter()
        .filter(|r| r["actor"] == actor)
        .collect()
}

// ---------------------------------------------------------------------------------------
// reload: SIGHUP and file change

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_real_binary() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = standard_config(up.addr);
    let path = write_config(dir.path(), &config);
    let broker = ChildBroker::spawn(&path);
    let token = token_at(broker.proxy, "github:issues.read").await;
    assert_eq!(get_at(broker.proxy, ISSUES, &token).await.0, 200);

    std::fs::write(&path, narrowed(&config)).unwrap();
    broker.signal("HUP");
    eventually("the narrowed grant refuses the issued token", || async {
        get_at(broker.proxy, ISSUES, &token).await.0 == 403
    })
    .await;
    broker.stop().await;
    let records = audit_records(&dir.path().join("audit.jsonl"));
    let reloads = events(&records, "admin");
    assert_eq!(reloads[0]["actor"], "signal:SIGHUP", "{reloads:?}");
    assert_eq!(reloads[0]["action"], "reload");
    assert_eq!(reloads[0]["result"], "ok");
}

/// One broken save reloaded by the API is one failed reload: the watcher does not try the
/// same bytes again after the API's reload failed on them.
#[tokio::test]
async fn a_broken_save_reloaded_by_the_api_is_not_tried_again_by_the_watcher() {
    let up = FakeUpstream::start().await;
    let b = TestBroker::start(&standard_config(up.addr)).await;
    std::fs::write(b.config_path(), "[server]\nlisten = ").unwrap();
    assert_eq!(b.admin_call("POST", "/v1/reload", "").await.0, 400);
    // Well past the watcher's poll and debounce.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let records = b.audit();
    let failed: Vec<_> = events(&records, "admin")
        .into_iter()
        .filter(|r| r["result"] == "failed")
        .map(|r| r["actor"].as_str().unwrap().to_owned())
        .collect();
    // (On a slow machine the watcher may have tried first; never after the API.)
    let api = failed
        .iter()
        .position(|actor| actor.starts_with("admin@"))
        .expect("the API's failed reload is recorded");
    assert_eq!(
        api,
        failed.len() - 1,
        "tried again after the API: {failed:?}"
    );
    assert!(failed.len() <= 2, "{failed:?}");
}

#[tokio::test]
async fn a_changed_config_file_reloads_without_any_call() {
    let up = FakeUpstream::start().await;
    let config = standard_config(up.addr);
    let b = TestBroker::start(&config).await;
    let token = b.token("github:issues.read", &[]).await;
    assert_eq!(b.status("GET", ISSUES, &token).await, 200);

    // a broken save is refused (and audited); the old config keeps serving
    std::fs::write(b.config_path(), "[server]\nlisten = ").unwrap();
    eventually("a failed reload by the watcher", || async {
        admin_records(&b.audit(), "watch")
            .iter()
            .any(|r| r["result"] == "failed")
    })
    .await;
    assert_eq!(b.status("GET", ISSUES, &token).await, 200);

    // the fixed, narrowed save takes effect on the token already issued
    std::fs::write(b.config_path(), narrowed(&config)).unwrap();
    eventually("the narrowed grant refuses the issued token", || async {
        b.status("GET", ISSUES, &token).await == 403
    })
    .await;
    let records = b.audit();
    let watch = admin_records(&records, "watch");
    assert_eq!(watch.len(), 2, "one reload per settled change: {watch:?}");
    assert_eq!(watch[1]["result"], "ok");
    let denied = events(&records, "proxy").into_iter().last().unwrap();
    assert_eq!(denied["reason"], "not_granted");
    let allowed = events(&records, "proxy")
        .iter()
        .filter(|r| r["decision"] == "allow")
        .count();
    assert_eq!(
        up.count(),
        allowed,
        "only allowed calls reached the upstream"
    );

    // Saved back to bytes the watcher loaded before, after an API reload put others in force
    // (a `git checkout` back): loaded again.
    std::fs::write(b.config_path(), &config).unwrap();
    assert_eq!(b.admin_call("POST", "/v1/reload", "").await.0, 200);
    let token = b.token("github:issues.read", &[]).await;
    assert_eq!(b.status("GET", ISSUES, &token).await, 200);
    std::fs::write(b.config_path(), narrowed(&config)).unwrap();
    eventually(
        "the narrowed save, seen before, is loaded again",
        || async { b.status("GET", ISSUES, &token).await == 403 },
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// rate limits (DESIGN §4.3 row 5)

/// Calls until one is refused; the first must pass. Returns the refusal's headers and body.
async fn until_429(b: &TestBroker, token: &str) -> (http::HeaderMap, String) {
    let (first, _, _) = b.call("GET", ISSUES, token).await;
    assert_eq!(first, 200);
    for _ in 0..5 {
        let (s, h, body) = b.call("GET", ISSUES, token).await;
        if s == 429 {
            return (h, body);
        }
        assert_eq!(s, 200);
    }
    panic!("no 429 within the burst");
}

fn assert_rate_limited(h: &http::HeaderMap, body: &str) {
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    assert!(body.contains("\"error\":\"rate_limited\""), "{body}");
}

#[tokio::test]
async fn client_and_connector_limits_answer_429_with_retry_after() {
    let up = FakeUpstream::start().await;
    let limited_client = standard_config(up.addr).replace(
        "secret_sha256 = \"",
        "rate_limit = { per_second = 1, burst = 1 }\nsecret_sha256 = \"",
    );
    let b = TestBroker::start(&limited_client).await;
    let token = b.token("github:issues.read", &[]).await;
    let (h, body) = until_429(&b, &token).await;
    assert_rate_limited(&h, &body);
    let records = b.audit();
    let denied = events(&records, "proxy").into_iter().last().unwrap();
    assert_eq!(denied["decision"], "deny");
    assert_eq!(denied["reason"], "client_rate_limited");
    assert_eq!(denied["status"], 429);

    let limited_connector = standard_config(up.addr).replace(
        "upstream_timeout = \"2s\"",
        "upstream_timeout = \"2s\"\nrate_limit = { per_second = 1, burst = 1 }",
    );
    let b = TestBroker::start(&limited_connector).await;
    let token = b.token("github:issues.read", &[]).await;
    let (h, body) = until_429(&b, &token).await;
    assert_rate_limited(&h, &body);
    let records = b.audit();
    let denied = events(&records, "proxy").into_iter().last().unwrap();
    assert_eq!(denied["reason"], "connector_rate_limited");
    assert_eq!(denied["status"], 429);
}

#[tokio::test]
async fn token_requests_are_limited_per_client() {
    let up = FakeUpstream::start().await;
    let config = standard_config(up.addr).replace(
        "issuer = \"credbroker-test\"",
        "issuer = \"credbroker-test\"\nissue_rate_limit = { per_second = 1, burst = 1 }",
    );
    let b = TestBroker::start(&config).await;
    let mut refused = None;
    for _ in 0..5 {
        let (s, h, body) = b
            .token_request("bot", SECRET, "github:issues.read", &[])
            .await;
        if s == 429 {
            refused = Some((h, body));
            break;
        }
        assert_eq!(s, 200);
    }
    let (h, body) = refused.expect("a 429 within the burst");
    assert_rate_limited(&h, &body);
    let denied = events(&b.audit(), "token_denied")
        .into_iter()
        .last()
        .cloned()
        .unwrap();
    assert_eq!(denied["client"], "bot");
    assert_eq!(denied["reason"], "rate_limited");
}

// ---------------------------------------------------------------------------------------
// metrics (DESIGN §4.4)

/// The value of the sample `name{labels}` (exactly that label set); 0 when absent.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, set) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            let got: Vec<&str> = set.split(',').filter(|p| !p.is_empty()).collect();
            let matches = n == name
                && got.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| got.contains(&format!("{k}=\"{v}\"").as_str()));
            matches.then(|| value.parse().unwrap())
        })
        .next()
        .unwrap_or(0.0)
}

/// The classic Prometheus text format (DESIGN §4.4), what a scraper gets unless it asks for
/// OpenMetrics; checked to carry the same samples as the OpenMetrics answer.
async fn scrape(b: &TestBroker) -> String {
    let (s, h, body) = b.admin_call("GET", "/metrics", "").await;
    assert_eq!(s, 200);
    assert_eq!(
        h["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    assert!(body.contains("# TYPE credbroker_proxy_requests_total counter\n"));
    assert!(!body.contains("# EOF"));
    let req = Request::get("/metrics")
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
        )
        .body(String::new())
        .unwrap();
    let (s, h, om) = send(b.admin.unwrap(), req).await;
    assert_eq!(s, 200);
    assert!(h["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    assert!(om.ends_with("# EOF\n"));
    let samples = |t: &str| t.lines().filter(|l| !l.starts_with('#')).count();
    assert_eq!(samples(&om), samples(&body));
    body
}

#[tokio::test]
async fn metrics_are_served_to_admins_and_count() {
    let up = FakeUpstream::start().await;
    let b = TestBroker::start(&standard_config(up.addr)).await;
    let unauthenticated = Request::get("/metrics").body(String::new()).unwrap();
    assert_eq!(send(b.admin.unwrap(), unauthenticated).await.0, 401);

    let before = scrape(&b).await;
    let allow = [
        ("connector", "github"),
        ("operation", "issues.read"),
        ("decision", "allow"),
    ];
    // The operation the call matched but may not use is named (a config-defined label).
    let out_of_scope = [
        ("connector", "github"),
        ("operation", "repos.delete"),
        ("decision", "deny"),
        ("reason", "not_in_token_scope"),
    ];
    let github = [("connector", "github")];
    let token = b.token("github:issues.read", &[]).await;
    let (bad, _, _) = b
        .token_request("bot", "wrong", "github:issues.read", &[])
        .await;
    assert_eq!(bad, 401);
    for _ in 0..2 {
        assert_eq!(b.status("GET", ISSUES, &token).await, 200);
    }
    assert_eq!(
        b.status("DELETE", "/github/repos/acme/widget", &token)
            .await,
        403
    );
    assert_eq!(b.status("GET", "/nope/x", &token).await, 403);
    assert_eq!(b.admin_call("POST", "/v1/reload", "").await.0, 200);
    let after = scrape(&b).await;

    let delta = |name: &str, labels: &[(&str, &str)]| {
        metric(&after, name, labels) - metric(&before, name, labels)
    };
    assert_eq!(delta("credbroker_proxy_requests_total", &allow), 2.0);
    assert_eq!(delta("credbroker_proxy_requests_total", &out_of_scope), 1.0);
    let unknown = [
        ("connector", ""),
        ("operation", ""),
        ("decision", "deny"),
        ("reason", "unknown_connector"),
    ];
    assert_eq!(delta("credbroker_proxy_requests_total", &unknown), 1.0);
    assert!(!after.contains("nope"), "a made-up connector is no label");
    assert_eq!(
        delta("credbroker_tokens_issued_total", &[("client", "bot")]),
        1.0
    );
    let bad_client = [("client", ""), ("reason", "invalid_client")];
    assert_eq!(delta("credbroker_tokens_denied_total", &bad_client), 1.0);
    // the two allowed calls end when their bodies do; the denial at once
    eventually_metric(
        &b,
        "credbroker_proxy_request_duration_seconds_count",
        &github,
        3.0,
    )
    .await;
    assert_eq!(
        delta("credbroker_upstream_duration_seconds_count", &github),
        2.0
    );
    assert_eq!(
        delta("credbroker_config_reloads_total", &[("result", "ok")]),
        1.0
    );
    // 1 token_issued + 1 token_denied + 2 × (proxy + proxy_result) + 2 denials + 1 admin,
    // except the proxy_result records that may still be on their way
    assert!(delta("credbroker_audit_records_total", &[]) >= 6.0);
    assert!(metric(&after, "credbroker_audit_fsync_duration_seconds_count", &[]) >= 1.0);
    assert_eq!(
        metric(&after, "credbroker_audit_write_errors_total", &[]),
        0.0
    );
    // "2099-12-31" is usable through that day
    assert_eq!(
        metric(
            &after,
            "credbroker_connector_expiry_timestamp_seconds",
            &github
        ),
        4_102_444_800.0
    );
    assert_eq!(metric(&after, "credbroker_connector_enabled", &github), 1.0);
    assert!(!after.contains(CREDENTIAL) && !after.contains(&token));
    let (_, _, view) = b.admin_call("GET", "/v1/connectors", "").await;
    let view: serde_json::Value = serde_json::from_str(&view).unwrap();
    assert_eq!(view["connectors"][0]["usage"]["allowed"], 2);
    assert_eq!(view["connectors"][0]["usage"]["denied"], 1);
}

async fn eventually_metric(b: &TestBroker, name: &str, labels: &[(&str, &str)], want: f64) {
    eventually(name, || async {
        metric(&scrape(b).await, name, labels) == want
    })
    .await;
}

/// Saturation for ops: each listener's open connections against its `max_connections`.
#[tokio::test]
async fn metrics_show_open_connections_against_the_limit() {
    let up = FakeUpstream::start().await;
    let config =
        standard_config(up.addr).replacen("[server]\n", "[server]\nmax_connections = 7\n", 1);
    let b = TestBroker::start(&config).await;
    let proxy = [("listener", "proxy")];
    let text = scrape(&b).await;
    assert_eq!(metric(&text, "credbroker_connections_limit", &proxy), 7.0);
    assert_eq!(metric(&text, "credbroker_connections_open", &proxy), 0.0);
    // The scrape's own connection is open while it is answered.
    assert!(
        metric(
            &text,
            "credbroker_connections_open",
            &[("listener", "admin")]
        ) >= 1.0
    );
    let held: Vec<tokio::net::TcpStream> =
        futures_util::future::join_all((0..3).map(|_| tokio::net::TcpStream::connect(b.addr)))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
    eventually_metric(&b, "credbroker_connections_open", &proxy, 3.0).await;
    drop(held);
    eventually_metric(&b, "credbroker_connections_open", &proxy, 0.0).await;
}

#[tokio::test]
async fn an_unreachable_upstream_counts_as_an_upstream_error() {
    // port 9 (discard) on loopback: nothing listens there in a test environment
    let b = TestBroker::start(&standard_config("127.0.0.1:9".parse().unwrap())).await;
    let token = b.token("github:issues.read", &[]).await;
    assert_eq!(b.status("GET", ISSUES, &token).await, 502);
    let text = scrape(&b).await;
    let connect = [("connector", "github"), ("kind", "connect")];
    assert_eq!(
        metric(&text, "credbroker_upstream_errors_total", &connect),
        1.0
    );
}

// ---------------------------------------------------------------------------------------
// expired connectors (DESIGN §3.3)

#[tokio::test]
async fn an_expired_connector_refuses_calls_and_check_flags_it() {
    let up = FakeUpstream::start().await;
    let config = standard_config(up.addr);
    let b = TestBroker::start(&config).await;
    let token = b.token("github:issues.read", &[]).await;
    let expired = config.replace("expires = \"2099-12-31\"", "expires = \"2020-01-01\"");
    std::fs::write(b.config_path(), &expired).unwrap();
    assert_eq!(b.admin_call("POST", "/v1/reload", "").await.0, 200);

    let (s, h, body) = b.call("GET", ISSUES, &token).await;
    assert_eq!(s, 403);
    assert!(body.contains("insufficient_scope"), "{body}");
    assert!(h["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("insufficient_scope"));
    let denied = events(&b.audit(), "proxy")
        .into_iter()
        .last()
        .cloned()
        .unwrap();
    assert_eq!(denied["reason"], "connector_expired");
    let (s, _, body) = b
        .token_request("bot", SECRET, "github:issues.read", &[])
        .await;
    assert_eq!(s, 400);
    assert!(body.contains("invalid_scope"), "{body}");
    assert_eq!(up.count(), 0);
    let text = scrape(&b).await;
    let github = [("connector", "github")];
    assert_eq!(
        metric(
            &text,
            "credbroker_connector_expiry_timestamp_seconds",
            &github
        ),
        1_577_923_200.0 // 2020-01-02T00:00:00Z
    );

    let o = Command::new(BIN)
        .args(["check", "--config", b.config_path().to_str().unwrap()])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "an expired connector is a warning"
    );
    let line = out
        .lines()
        .find(|l| l.contains("connectors[github].expires"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.starts_with("warning: ") && line.contains("expired"),
        "{line}"
    );
}

// ---------------------------------------------------------------------------------------
// `check` (DESIGN §3.6): every error and warning, one table

const ADMIN_SHA: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// A config with no finding at all: TLS, a signing key, a file credential, a rate limit,
/// every operation granted, every client with a grant.
fn clean_config(client_sha: &str) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:0"
tls_cert = "certs/server.pem"
tls_key = "certs/server-key.pem"

[admin]
listen = "127.0.0.1:0"
token_sha256 = "{ADMIN_SHA}"

[tokens]
signing_key = "signing.pem"
max_ttl = "900s"

[audit]
path = "audit.jsonl"

[[connectors]]
name = "github"
owner = "platform@acme.example"
purpose = "lint table"
expires = "2099-12-31"
upstream = "https://api.github.com"
credential = "file:credential.txt"
rate_limit = {{ per_second = 10, burst = 20 }}

  [[connectors.operations]]
  name = "issues.read"
  method = "GET"
  path = "/repos/acme/{{repo}}/issues"

[[clients]]
id = "bot"
owner = "platform@acme.example"
secret_sha256 = "{client_sha}"
grants = [ {{ connector = "github", operations = ["issues.read"], max_ttl = "120s" }} ]
"#
    )
}

struct Case {
    what: &'static str,
    /// Replace the first `.0` by `.1`; an empty `.0` appends `.1`.
    edit: (&'static str, String),
    error: bool,
    /// The finding's key (the config location after `file:line:`).
    key: &'static str,
    message: &'static str,
    /// Whether the finding names a line (a removed key has none to name).
    has_line: bool,
}

fn case(
    what: &'static str,
    from: &'static str,
    to: impl Into<String>,
    error: bool,
    key: &'static str,
    message: &'static str,
) -> Case {
    Case {
        what,
        edit: (from, to.into()),
        error,
        key,
        message,
        has_line: true,
    }
}

fn cases(sha: &str) -> Vec<Case> {
    let soon = (chrono::Utc::now() + chrono::Duration::days(10))
        .format("%Y-%m-%d")
        .to_string();
    let op = |name: &str, method: &str, path: &str| {
        format!("  [[connectors.operations]]\n  name = \"{name}\"\n  method = \"{method}\"\n  path = \"{path}\"\n\n[[clients]]")
    };
    let client = |id: &str, grants: &str| {
        format!("\n[[clients]]\nid = \"{id}\"\nowner = \"o\"\nsecret_sha256 = \"{sha}\"\n{grants}")
    };
    let mut cases = vec![
        // errors
        case("unparsable file", "[tokens]", "[tokens", true, "[tokens", ""),
        case("unknown key", "max_ttl = \"900s\"", "max_ttl = \"900s\"\nbogus = 1", true, ": bogus: ", "unknown field `bogus`"),
        case("missing required field", "purpose = \"lint table\"\n", "", true, ": connectors.purpose: ", "missing field `purpose`"),
        case("duplicate connector", "[[clients]]", "[[connectors]]\nname = \"github\"\nowner = \"o\"\npurpose = \"p\"\nexpires = \"2099-12-31\"\nupstream = \"https://a.example\"\ncredential = \"file:credential.txt\"\n\n[[clients]]", true, "connectors[github]", "duplicate connector name"),
        case("duplicate operation", "[[clients]]", op("issues.read", "POST", "/x"), true, "connectors[github].operations[issues.read]", "duplicate operation name"),
        case("duplicate client", "", client("bot", "grants = [ { connector = \"github\", operations = [\"issues.read\"] } ]"), true, "clients[bot]", "duplicate client id"),
        case("grant of an unknown connector", "connector = \"github\", operations", "connector = \"gitlab\", operations", true, "clients[bot].grants[0]", "unknown connector `gitlab`"),
        case("grant of an unknown operation", "operations = [\"issues.read\"]", "operations = [\"issues.read\", \"issues.write\"]", true, "clients[bot].grants[0]", "no operation `issues.write`"),
        case("invalid pattern", "path = \"/repos/acme/{repo}/issues\"", "path = \"/repos/acme/{repo/issues\"", true, "connectors[github].operations[issues.read].path", "invalid pattern"),
        case("unresolvable credential", "credential = \"file:credential.txt\"", "credential = \"env:CREDBROKER_OPS_TEST_UNSET\"", true, "connectors[github].credential", "CREDBROKER_OPS_TEST_UNSET is not set"),
        case("unreadable credential file", "credential = \"file:credential.txt\"", "credential = \"file:missing.txt\"", true, "connectors[github].credential", "cannot read secret file"),
        case("grant max_ttl above tokens.max_ttl", "max_ttl = \"120s\"", "max_ttl = \"2h\"", true, "clients[bot].grants[0].max_ttl", "above tokens.max_ttl"),
        case("http upstream off loopback", "upstream = \"https://api.github.com\"", "upstream = \"http://api.github.com\"", true, "connectors[github].upstream", "loopback"),
        case("query name no request can carry", "path = \"/repos/acme/{repo}/issues\"", "path = \"/repos/acme/{repo}/issues\"\n  query = [\"state\", \"state=open\"]", true, "connectors[github].operations[issues.read].query[1]", "never match"),
        case("unreadable signing key", "signing_key = \"signing.pem\"", "signing_key = \"missing.pem\"", true, "tokens.signing_key", ""),
        case("unreadable TLS file", "tls_cert = \"certs/server.pem\"", "tls_cert = \"certs/missing.pem\"", true, "server.tls_cert", "cannot read"),
        // warnings
        case("plain HTTP listener", "tls_cert = \"certs/server.pem\"\ntls_key = \"certs/server-key.pem\"\n", "", false, "server.listen", "plain HTTP listener"),
        case("literal: credential", "credential = \"file:credential.txt\"", "credential = \"literal:abc\"", false, "connectors[github].credential", "literal: secret"),
        case("literal: audit key", "path = \"audit.jsonl\"", "path = \"audit.jsonl\"\nhmac_key = \"literal:k\"", false, "audit.hmac_key", "literal: secret"),
        case("catch-all pattern", "path = \"/repos/acme/{repo}/issues\"", "path = \"/repos/acme/{*rest}\"", false, "connectors[github].operations[issues.read].path", "broad"),
        case("literal '*' in a pattern", "path = \"/repos/acme/{repo}/issues\"", "path = \"/repos/acme/*/issues\"", false, "connectors[github].operations[issues.read].path", "matched literally"),
        case("connector expiring soon", "expires = \"2099-12-31\"", format!("expires = \"{soon}\""), false, "connectors[github].expires", "within 30 days"),
        case("connector expired", "expires = \"2099-12-31\"", "expires = \"2020-01-01\"", false, "connectors[github].expires", "has expired"),
        case("operation granted to no client", "[[clients]]", op("repos.delete", "DELETE", "/repos/acme/{repo}"), false, "connectors[github].operations[repos.delete]", "granted to no client"),
        case("client with no grants", "", client("idle", ""), false, "clients[idle]", "has no grants"),
        case("connector without rate limit", "rate_limit = { per_second = 10, burst = 20 }\n", "", false, "connectors[github]", "no rate_limit"),
        case("plain admin listener off loopback", "listen = \"127.0.0.1:0\"\ntoken_sha256", "listen = \"0.0.0.0:0\"\ntoken_sha256", false, "admin.listen", "non-loopback"),
        case("expired time-bound grant", "max_ttl = \"120s\" }", "max_ttl = \"120s\", expires = \"2020-01-01T00:00:00Z\", reason = \"INC-1\" }", false, "clients[bot].grants[0]", "time-bound grant has expired"),
    ];
    let mut ephemeral = case(
        "ephemeral signing key",
        "signing_key = \"signing.pem\"\n",
        "",
        false,
        "tokens.signing_key",
        "ephemeral key",
    );
    ephemeral.has_line = false;
    cases.push(ephemeral);
    cases
}

fn run_check(path: &Path) -> (Option<i32>, String) {
    let o = Command::new(BIN)
        .args(["check", "--config", path.to_str().unwrap()])
        .env_remove("CREDBROKER_OPS_TEST_UNSET")
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

#[test]
fn check_reports_every_error_and_warning_of_the_design() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for args in [
        vec!["keygen", "signing-key", "--out", "signing.pem"],
        vec!["keygen", "dev-certs", "--out", "certs"],
    ] {
        assert!(Command::new(BIN)
            .args(&args)
            .current_dir(d)
            .status()
            .unwrap()
            .success());
    }
    std::fs::write(d.join("credential.txt"), "real-credential\n").unwrap();
    let clean = clean_config(&sha256_hex(SECRET));
    let path = write_config(d, &clean);
    let (code, out) = run_check(&path);
    assert_eq!((code, out.as_str()), (Some(0), ""), "the base is clean");

    let mut failures = Vec::new();
    for c in cases(&sha256_hex(SECRET)) {
        let (from, to) = &c.edit;
        let text = if from.is_empty() {
            format!("{clean}{to}")
        } else {
            assert!(clean.contains(from), "{}: edit does not apply", c.what);
            clean.replacen(from, to, 1)
        };
        std::fs::write(&path, &text).unwrap();
        let (code, out) = run_check(&path);
        let level = if c.error { "error: " } else { "warning: " };
        let file = format!("{}:", path.display());
        let found = out.lines().any(|l| {
            let Some(rest) = l.strip_prefix(level).and_then(|r| r.strip_prefix(&file)) else {
                return false;
            };
            let line_no = rest.split(':').next().unwrap_or("");
            let has_line = !line_no.is_empty() && line_no.bytes().all(|b| b.is_ascii_digit());
            has_line == c.has_line && rest.contains(c.key) && rest.contains(c.message)
        });
        let want_code = Some(if c.error { 1 } else { 0 });
        if !found || code != want_code {
            failures.push(format!("{} (exit {code:?}):\n{out}", c.what));
        }
        // one finding a line, each with a severity and the file
        for l in out.lines() {
            assert!(
                l.starts_with(&format!("error: {file}"))
                    || l.starts_with(&format!("warning: {file}")),
                "{}: {l}",
                c.what
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------
// graceful shutdown (DESIGN §6)

/// An upstream that answers 200 after `delay`, and says when a request arrived.
async fn slow_upstream(delay: Duration) -> (SocketAddr, Arc<Notify>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let arrived = Arc::new(Notify::new());
    let signal = Arc::clone(&arrived);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let signal = Arc::clone(&signal);
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<Incoming>| {
                    let signal = Arc::clone(&signal);
                    async move {
                        signal.notify_one();
                        tokio::time::sleep(delay).await;
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                            b"{\"slow\":\"done\"}",
                        ))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, arrived)
}

/// A child broker (config: the standard one, `edit`ed) with one call in flight at an upstream
/// that answers after `delay`; the call's answer comes from the returned task.
async fn a_call_at_a_slow_upstream(
    delay: Duration,
    edit: impl Fn(String) -> String,
) -> (
    tempfile::TempDir,
    ChildBroker,
    tokio::task::JoinHandle<(u16, String)>,
) {
    let (upstream, arrived) = slow_upstream(delay).await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &edit(standard_config(upstream)));
    let broker = ChildBroker::spawn(&path);
    let token = token_at(broker.proxy, "github:issues.read").await;
    let proxy = broker.proxy;
    let call = tokio::spawn(async move { get_at(proxy, ISSUES, &token).await });
    tokio::time::timeout(Duration::from_secs(10), arrived.notified())
        .await
        .expect("the call reached the upstream");
    (dir, broker, call)
}

/// A broker whose stderr reader died (`serve 2>&1 | shipper`, the shipper restarted) loses its
/// log lines, nothing else: a reload, a failed call (both logged) and a stop work as ever.
#[tokio::test]
async fn a_broken_stderr_pipe_loses_log_lines_not_calls() {
    let up = FakeUpstream::start().await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let config = standard_config(up.addr)
        + &format!(
            r#"
[[connectors]]
name = "gone"
owner = "platform@acme.example"
purpose = "an upstream that refuses connections"
expires = "2099-12-31"
upstream = "http://{dead}"
credential = "literal:gone-credential"
  [[connectors.operations]]
  name = "read"
  method = "GET"
  path = "/x"
"#
        );
    let config = config.replacen(
        "grants = [",
        "grants = [ { connector = \"gone\", operations = [\"read\"] },",
        1,
    );
    let path = write_config(dir.path(), &config);
    let mut serve = Command::new(BIN);
    serve.args(["serve", "--config", path.to_str().unwrap()]);
    let mut broker = ChildBroker::spawn_logging(serve, "info", true);
    // Give the reader's end time to close before anything is logged.
    tokio::time::sleep(Duration::from_millis(200)).await;
    broker.signal("HUP");
    let token = token_at(broker.proxy, "github:issues.read gone:read").await;
    for _ in 0..3 {
        assert_eq!(get_at(broker.proxy, "/gone/x", &token).await.0, 502);
    }
    assert_eq!(get_at(broker.proxy, ISSUES, &token).await.0, 200);
    broker.signal("TERM");
    assert_eq!(broker.exit().await.code(), Some(0));
    let records = audit_records(&dir.path().join("audit.jsonl"));
    assert_eq!(records.last().unwrap()["event"], "shutdown", "{records:?}");
    assert_eq!(events(&records, "proxy_result").len(), 4);
    let reloads: Vec<_> = events(&records, "admin")
        .into_iter()
        .map(|r| r["result"].clone())
        .collect();
    assert_eq!(reloads, [serde_json::json!("ok")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_slow_call_completes_it_and_exits_0() {
    // A 4 s upstream (within an upstream_timeout of 10 s): room, on a loaded machine, to see
    // the listener close while the call still drains.
    let (dir, mut broker, call) = a_call_at_a_slow_upstream(Duration::from_secs(4), |c| {
        c.replace("upstream_timeout = \"2s\"", "upstream_timeout = \"10s\"")
            .replace("request_timeout = \"5s\"", "request_timeout = \"15s\"")
    })
    .await;
    broker.signal("TERM");
    // DESIGN §6: stop accepting — new connections are refused while the call drains.
    let deadline = Instant::now() + Duration::from_secs(3);
    while tokio::net::TcpStream::connect(broker.proxy).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !call.is_finished(),
        "refused while the call was still in flight"
    );

    let (status, body) = call.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, "{\"slow\":\"done\"}");
    assert_eq!(broker.exit().await.code(), Some(0));
    let records = audit_records(&dir.path().join("audit.jsonl"));
    assert_eq!(records.last().unwrap()["event"], "shutdown", "{records:?}");
    let result = events(&records, "proxy_result");
    assert_eq!(result.len(), 1);
    assert_eq!(result[0]["status"], 200);
    verify_chain_independently(&dir.path().join("audit.jsonl"));
}

/// A drain that would take long (here a 30 s upstream within a 60 s request_timeout) is cut
/// short by a second stop signal: the process exits at once, with 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stop_signal_cuts_the_drain_short() {
    let (_dir, mut broker, _call) = a_call_at_a_slow_upstream(Duration::from_secs(30), |c| {
        c.replace("request_timeout = \"5s\"", "request_timeout = \"60s\"")
            .replace("upstream_timeout = \"2s\"", "upstream_timeout = \"40s\"")
    })
    .await;
    broker.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(broker.child.try_wait().unwrap().is_none(), "still draining");
    let second = Instant::now();
    broker.signal("INT");
    assert_eq!(broker.exit().await.code(), Some(1));
    assert!(
        second.elapsed() < Duration::from_secs(3),
        "{:?}",
        second.elapsed()
    );
}

/// A config file changed while the broker started (after it was read) is still watched: the
/// watcher's first look finds it differs from the config in force and reloads it.
#[tokio::test]
async fn a_config_changed_during_the_start_is_reloaded() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let first = standard_config(up.addr);
    let path = write_config(dir.path(), &first);
    let config = credbroker::config::Config::load(&path).unwrap();
    let changed = narrowed(&first);
    std::fs::write(&path, &changed).unwrap();
    let running = credbroker::cli::serve::start(config).await.unwrap();
    let wanted = sha256_hex(&changed);
    let deadline = Instant::now() + Duration::from_secs(5);
    while running.broker.live().config.sha256 != wanted {
        assert!(
            Instant::now() < deadline,
            "the changed file was never loaded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.shutdown().await;
}

/// Both listeners are bound before anything is recorded or served: an admin port in use
/// fails the start with no `startup` record (and no proxy listener left serving), and a torn
/// tail left by the last run is neither cut nor recorded by the start that failed.
#[tokio::test]
async fn an_admin_port_in_use_fails_the_start_before_anything_is_recorded() {
    let up = FakeUpstream::start().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let config = standard_config(up.addr).replacen(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        &format!("[admin]\nlisten = \"127.0.0.1:{port}\""),
        1,
    );
    let taken_config = config;
    let path = write_config(dir.path(), &taken_config);
    let config = credbroker::config::Config::load(&path).unwrap();
    assert!(credbroker::cli::serve::start(config).await.is_err());
    let audit = dir.path().join("audit.jsonl");
    let records = if audit.exists() {
        audit_records(&audit)
    } else {
        Vec::new()
    };
    assert!(events(&records, "startup").is_empty(), "{records:?}");

    // A log with a torn last write: still exactly as it was after the failed start.
    let free = standard_config(up.addr);
    let running = credbroker::cli::serve::start(
        credbroker::config::Config::load(&write_config(dir.path(), &free)).unwrap(),
    )
    .await
    .unwrap();
    running.shutdown().await;
    let torn = b"{\"seq\":99,\"ts\":\"2026-";
    std::fs::OpenOptions::new()
        .append(true)
        .open(&audit)
        .unwrap()
        .write_all(torn)
        .unwrap();
    let before = std::fs::read(&audit).unwrap();
    let taken_again = write_config(dir.path(), &taken_config);
    let config = credbroker::config::Config::load(&taken_again).unwrap();
    assert!(credbroker::cli::serve::start(config).await.is_err());
    assert_eq!(
        std::fs::read(&audit).unwrap(),
        before,
        "the log was touched"
    );
}

/// The soft and hard "Max open files" of a process.
fn open_file_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let n: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (n[0], n[1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_raises_the_open_file_limit_for_max_connections() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config =
        standard_config(up.addr).replacen("[server]\n", "[server]\nmax_connections = 1000\n", 1);
    let path = write_config(dir.path(), &config);
    let broker = ChildBroker::spawn_with_soft_open_files(&path, 256);
    let (soft, hard) = open_file_limits(broker.child.id());
    // A client and an upstream connection each, an upstream connection for each HTTP/2
    // request in flight (as many), the admin listener's (256 by default), and some room: up
    // to the hard limit.
    assert_eq!(
        soft,
        hard.min(3 * 1000 + 256 + 256),
        "soft {soft}, hard {hard}"
    );
    broker.stop().await;
}

// ---------------------------------------------------------------------------------------
// revocations survive a restart (DESIGN §3.5)

/// The standard config with a persistent signing key (tokens outlive a restart), in `dir`.
fn restartable_config(dir: &Path, upstream: SocketAddr) -> PathBuf {
    write_config(dir, &with_signing_key(dir, &standard_config(upstream)))
}

/// The reasons of the `proxy` denials, in order.
fn deny_reasons(records: &[serde_json::Value]) -> Vec<String> {
    events(records, "proxy")
        .iter()
        .filter(|r| r["decision"] == "deny")
        .map(|r| r["reason"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_and_the_kill_switch_survive_a_restart() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = restartable_config(dir.path(), up.addr);

    let broker = ChildBroker::spawn(&path);
    let revoked = token_at(broker.proxy, "github:issues.read").await;
    let kept = token_at(broker.proxy, "github:issues.read").await;
    let body = format!("{{\"jti\":\"{}\"}}", jti_of(&revoked));
    assert_eq!(
        admin_at(broker.admin, "POST", "/v1/revoke", &body).await.0,
        200
    );
    broker.stop().await;

    let broker = ChildBroker::spawn(&path);
    assert_eq!(get_at(broker.proxy, ISSUES, &revoked).await.0, 401);
    assert_eq!(get_at(broker.proxy, ISSUES, &kept).await.0, 200);
    let kill = "{\"connector\":\"github\"}";
    assert_eq!(
        admin_at(broker.admin, "POST", "/v1/revoke", kill).await.0,
        200
    );
    broker.stop().await;

    let broker = ChildBroker::spawn(&path);
    assert_eq!(get_at(broker.proxy, ISSUES, &kept).await.0, 403);
    assert_eq!(
        admin_at(broker.admin, "POST", "/v1/enable", kill).await.0,
        200
    );
    assert_eq!(get_at(broker.proxy, ISSUES, &kept).await.0, 200);
    broker.stop().await;

    let records = audit_records(&dir.path().join("audit.jsonl"));
    assert_eq!(
        deny_reasons(&records),
        ["token_revoked", "connector_disabled"]
    );
    assert_eq!(events(&records, "startup").len(), 3);
    assert_eq!(up.count(), 2);
    verify_chain_independently(&dir.path().join("audit.jsonl"));
}

/// DESIGN §4.1: a `max_uses` token is accepted that many times, then refused — also across a
/// restart of the `memory` backend, whose counters die with the process: a token issued
/// before the restart is refused (its count is unknown), one issued after it counts afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_gives_a_spent_max_uses_token_no_uses_back() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = restartable_config(dir.path(), up.addr);
    let broker = ChildBroker::spawn(&path);
    let once = token_with_at(broker.proxy, "github:issues.read", &[("max_uses", "1")]).await;
    let unused = token_with_at(broker.proxy, "github:issues.read", &[("max_uses", "1")]).await;
    assert_eq!(get_at(broker.proxy, ISSUES, &once).await.0, 200);
    assert_eq!(get_at(broker.proxy, ISSUES, &once).await.0, 401);
    broker.stop().await;

    let broker = ChildBroker::spawn(&path);
    // Issued by this run, likely in its first second: counted, not refused.
    let fresh = token_with_at(broker.proxy, "github:issues.read", &[("max_uses", "1")]).await;
    let (status, body) = get_at(broker.proxy, ISSUES, &once).await;
    assert_eq!(status, 401, "spent before the restart: {body}");
    assert_eq!(get_at(broker.proxy, ISSUES, &unused).await.0, 401);
    assert_eq!(get_at(broker.proxy, ISSUES, &fresh).await.0, 200);
    assert_eq!(get_at(broker.proxy, ISSUES, &fresh).await.0, 401);
    // A token without max_uses outlives the restart as before.
    let plain = token_at(broker.proxy, "github:issues.read").await;
    assert_eq!(get_at(broker.proxy, ISSUES, &plain).await.0, 200);
    broker.stop().await;
    assert_eq!(up.count(), 3);
    let records = audit_records(&dir.path().join("audit.jsonl"));
    assert_eq!(
        deny_reasons(&records),
        [
            "max_uses_exhausted",
            "max_uses_unknown",
            "max_uses_unknown",
            "max_uses_exhausted"
        ]
    );
}

// ---------------------------------------------------------------------------------------
// `serve` runs one worker runtime per core (src/workers.rs)

/// The names of a process's threads.
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .filter_map(Result::ok)
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .map(|name| name.trim().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_over_every_worker_are_each_audited_once_in_a_verifying_chain() {
    // Under `always` answers go through the per-worker relays; under `never` concurrent
    // calls on a worker share writes. Both must give every call its own allow record.
    for fsync in ["always", "never"] {
        let up = FakeUpstream::start().await;
        let dir = tempfile::tempdir().unwrap();
        let config =
            standard_config(up.addr).replace("fsync = \"always\"", &format!("fsync = \"{fsync}\""));
        let path = write_config(dir.path(), &config);
        let broker = ChildBroker::spawn(&path);
        // The child may run on as many cores as this test process (same affinity).
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let count_workers = || {
            thread_names(broker.child.id())
                .iter()
                .filter(|n| n.starts_with("credbroker-work"))
                .count()
        };
        // The worker threads may still be starting when the listener reports its address.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut workers = count_workers();
        while workers + 1 < cores && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            workers = count_workers();
        }
        assert_eq!(
            workers + 1,
            cores,
            "{fsync}: one runtime per core, the main one included"
        );

        let token = token_at(broker.proxy, "github:issues.read").await;
        let proxy = broker.proxy;
        // Each call on its own connection: connections are handed to workers round robin.
        let calls: Vec<_> = (0..40)
            .map(|_| {
                let token = token.clone();
                tokio::spawn(async move { get_at(proxy, ISSUES, &token).await.0 })
            })
            .collect();
        for call in calls {
            assert_eq!(call.await.unwrap(), 200, "{fsync}");
        }
        broker.stop().await;

        let log = dir.path().join("audit.jsonl");
        let records = audit_records(&log);
        let allowed = events(&records, "proxy")
            .iter()
            .filter(|r| r["decision"] == "allow")
            .count();
        assert_eq!(allowed, 40, "{fsync}");
        assert_eq!(events(&records, "proxy_result").len(), 40, "{fsync}");
        let mut ids: Vec<_> = events(&records, "proxy")
            .iter()
            .map(|r| r["request_id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 40, "{fsync}: one allow record per call");
        assert_eq!(up.count(), 40);
        verify_chain_independently(&log);
    }
}
