//! DESIGN §7: two replicas sharing one Redis — a revocation, a kill switch, a `max_uses`
//! budget and a rate limit made or spent on one are seen by the other, and a broker whose
//! Redis is gone refuses (503) instead of deciding on what it alone knows.
//!
//! Needs `redis-server` (CI installs it with apt). Without it, outside CI, these tests say so
//! and pass without running; in CI (`CI` set) a missing `redis-server` fails them.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_credbroker");
const TARGET: &str = "/github/repos/acme/widget/issues";
/// The body naming connector `github` at `/v1/revoke` (kill switch) and `/v1/enable`.
const GITHUB: &str = "{\"connector\":\"github\"}";

/// The `/v1/revoke` body for one token.
fn jti_body(jti: &str) -> String {
    format!("{{\"jti\":\"{jti}\"}}")
}

/// A `redis-server` of its own on a free loopback port, killed on drop.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    /// `None` (after saying why) when `redis-server` is missing outside CI.
    fn start() -> Option<Self> {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self::start_on(port)
    }

    fn start_on(port: u16) -> Option<Self> {
        let spawned = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
            // A replica's full sync writes an RDB file even with saving off: not into the
            // checkout.
            .args(["--dir", &std::env::temp_dir().to_string_lossy()])
            .args(["--dbfilename", &format!("credbroker-test-{port}.rdb")])
            .stdout(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) if std::env::var_os("CI").is_none() => {
                eprintln!("SKIPPED: redis-server not runnable ({e}); .ci/run installs it");
                return None;
            }
            Err(e) => panic!("redis-server is needed in CI: {e}"),
        };
        let redis = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(redis)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The standard config as replica `name` of a group sharing `redis` and one signing key.
fn replica_config(upstream: SocketAddr, key: &Path, redis: &Redis, name: &str) -> String {
    replica_config_at(upstream, key, &redis.url(), name)
}

/// [`replica_config`] with Redis at `url`.
fn replica_config_at(upstream: SocketAddr, key: &Path, url: &str, name: &str) -> String {
    let config = standard_config(upstream).replace(
        "issuer = \"credbroker-test\"",
        &format!(
            // The clock skew allowed between replicas: revocation cut-offs reach this far ahead.
            "issuer = \"credbroker-test\"\nleeway = \"1s\"\nsigning_key = \"{}\"",
            key.display()
        ),
    );
    format!("{config}\n[state]\nbackend = \"redis\"\nurl = \"{url}\"\nreplica = \"{name}\"\n")
}

/// Two replicas `a` and `b` over one Redis, with `edit` applied to both configs.
async fn two_replicas(
    redis: &Redis,
    up: &FakeUpstream,
    edit: impl Fn(String) -> String,
) -> (tempfile::TempDir, TestBroker, TestBroker) {
    let keys = tempfile::tempdir().unwrap();
    let key = keygen_signing_key(keys.path());
    let a = TestBroker::start(&edit(replica_config(up.addr, &key, redis, "a"))).await;
    let b = TestBroker::start(&edit(replica_config(up.addr, &key, redis, "b"))).await;
    (keys, a, b)
}

/// Waits (at most `within`) until `broker` issues a token whose call is allowed — the shared
/// state is decided on again, past any cut-off — and returns it; `what` names the wait.
async fn a_fresh_token_works(broker: &TestBroker, within: Duration, what: &str) -> String {
    let deadline = Instant::now() + within;
    loop {
        let (status, _, body) = broker
            .token_request("bot", SECRET, "github:issues.read", &[])
            .await;
        if status == 200 {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            let fresh = v["access_token"].as_str().unwrap().to_owned();
            if broker.status("GET", TARGET, &fresh).await == 200 {
                return fresh;
            }
        }
        assert!(Instant::now() < deadline, "{what}: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn reasons(broker: &TestBroker) -> Vec<String> {
    events(&broker.audit(), "proxy")
        .iter()
        .filter_map(|r| r["reason"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn revocations_and_the_kill_switch_made_on_one_replica_bite_on_the_other() {
    let Some(redis) = Redis::start() else { return };
    let up = FakeUpstream::start().await;
    let (_keys, a, b) = two_replicas(&redis, &up, |c| c).await;

    // A token from `a` works on `b`: one signing key, one JWKS.
    let token = a.token("github:issues.read", &[]).await;
    assert_eq!(b.status("GET", TARGET, &token).await, 200);

    // Revoked on `a`, refused by `b`.
    let body = jti_body(&jti_of(&token));
    let (status, _, answer) = a.admin_call("POST", "/v1/revoke", &body).await;
    assert_eq!(status, 200, "{answer}");
    let (status, headers, _) = b.call("GET", TARGET, &token).await;
    assert_eq!(status, 401);
    assert!(headers["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("invalid_token"));
    assert!(reasons(&b).iter().any(|r| r == "token_revoked"));

    // Every token of the client, revoked on `b`, refused by `a`.
    let other = a.token("github:issues.read", &[]).await;
    assert_eq!(a.status("GET", TARGET, &other).await, 200);
    let (status, _, _) = b
        .admin_call("POST", "/v1/revoke", "{\"client\":\"bot\"}")
        .await;
    assert_eq!(status, 200);
    assert_eq!(a.status("GET", TARGET, &other).await, 401);

    // The kill switch thrown on `a` stops `b`, and no token is issued for it there;
    // enabled again on `b`, `a` serves again.
    // Past the client revocation's cut-off: its second plus the 1 s clock-skew allowance.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let fresh = a.token("github:issues.read", &[]).await;
    let (status, _, _) = a.admin_call("POST", "/v1/revoke", GITHUB).await;
    assert_eq!(status, 200);
    assert_eq!(b.status("GET", TARGET, &fresh).await, 403);
    assert!(reasons(&b).iter().any(|r| r == "connector_disabled"));
    let (status, _, body) = b
        .token_request("bot", SECRET, "github:issues.read", &[])
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid_scope"));
    let (_, _, view) = b.admin_call("GET", "/v1/connectors", "").await;
    let view: serde_json::Value = serde_json::from_str(&view).unwrap();
    assert_eq!(view["connectors"][0]["enabled"], false);
    let (status, _, _) = b.admin_call("POST", "/v1/enable", GITHUB).await;
    assert_eq!(status, 200);
    assert_eq!(a.status("GET", TARGET, &fresh).await, 200);

    // Each replica's records name it, and each chain stands on its own.
    for (broker, name) in [(&a, "a"), (&b, "b")] {
        let records = broker.audit();
        assert!(!records.is_empty());
        assert!(records.iter().all(|r| r["replica"] == name), "{name}");
        verify_chain_independently(&broker.audit_path());
    }
    // `audit query` merges both files; SEQ says which chain a record belongs to.
    let out = Command::new(BIN)
        .args(["audit", "query"])
        .arg(a.audit_path())
        .arg(b.audit_path())
        .args(["--event", "startup"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    assert!(
        table.contains(" a:1 ") && table.contains(" b:1 "),
        "{table}"
    );
}

#[tokio::test]
async fn a_max_uses_budget_is_spent_once_across_replicas() {
    let Some(redis) = Redis::start() else { return };
    let up = FakeUpstream::start().await;
    let (_keys, a, b) = two_replicas(&redis, &up, |c| c).await;
    // Three uses, spent alternately on both replicas; the fourth is refused wherever it lands.
    let token = a.token("github:issues.read", &[("max_uses", "3")]).await;
    for broker in [&a, &b, &a] {
        assert_eq!(broker.status("GET", TARGET, &token).await, 200);
    }
    for broker in [&b, &a] {
        assert_eq!(broker.status("GET", TARGET, &token).await, 401);
    }
    assert!(reasons(&b).iter().any(|r| r == "max_uses_exhausted"));
    assert_eq!(up.count(), 3, "the spent calls never reached the upstream");
}

#[tokio::test]
async fn a_rate_limit_is_one_budget_across_replicas() {
    let Some(redis) = Redis::start() else { return };
    let up = FakeUpstream::start().await;
    let (_keys, a, b) = two_replicas(&redis, &up, |c| {
        c.replace(
            "id = \"bot\"\n",
            "id = \"bot\"\nrate_limit = { per_second = 1, burst = 5 }\n",
        )
    })
    .await;
    let token = a.token("github:issues.read", &[]).await;
    // Two replicas with limiters of their own would pass all ten calls (five each).
    let started = Instant::now();
    let mut passed = 0;
    for (i, broker) in [&a, &b].iter().cycle().take(10).enumerate() {
        let (status, headers, body) = broker.call("GET", TARGET, &token).await;
        match status {
            200 => passed += 1,
            429 => {
                let wait: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
                assert!(wait >= 1, "{wait}");
            }
            other => panic!("call {i}: {other} {body}"),
        }
        if i < 5 {
            assert_eq!(status, 200, "call {i} is within the burst");
        }
    }
    let refill = started.elapsed().as_secs() + 1;
    assert!(passed < 10 && passed <= 5 + refill, "{passed} passed");
    assert!(reasons(&a)
        .iter()
        .chain(&reasons(&b))
        .any(|r| r == "client_rate_limited"));
    assert_eq!(up.count() as u64, passed);
}

#[tokio::test]
async fn without_redis_nothing_is_decided_and_the_broker_recovers_with_it() {
    let Some(redis) = Redis::start() else { return };
    let up = FakeUpstream::start().await;
    let (_keys, a, _b) = two_replicas(&redis, &up, |c| c).await;
    let token = a.token("github:issues.read", &[]).await;
    assert_eq!(a.status("GET", TARGET, &token).await, 200);

    let port = redis.port;
    drop(redis);
    let started = Instant::now();
    let (status, _, body) = a.call("GET", TARGET, &token).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("state_unavailable"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(3), "bounded wait");
    // At once, though Redis answered well within the last second: a call failed since.
    assert_eq!(a.admin_call("GET", "/readyz", "").await.0, 503);
    assert_eq!(up.count(), 1, "nothing forwarded without the shared checks");
    assert!(reasons(&a).iter().any(|r| r == "state_unavailable"));
    let (status, _, body) = a
        .token_request("bot", SECRET, "github:issues.read", &[])
        .await;
    assert_eq!(status, 503, "{body}");
    // A revocation Redis cannot take is not lost: 503 (not in force where Redis is reached),
    // but kept and made once it can.
    let body = jti_body(&jti_of(&token));
    let (status, _, answer) = a.admin_call("POST", "/v1/revoke", &body).await;
    assert_eq!(status, 503, "{answer}");
    assert!(answer.contains("\"kept\":true"), "{answer}");
    let admin = events(&a.audit(), "admin")
        .last()
        .map(|r| (*r).clone())
        .unwrap();
    assert_eq!(admin["result"], "deferred");
    // An enable is never deferred: not applied, retry.
    let (status, _, answer) = a.admin_call("POST", "/v1/enable", GITHUB).await;
    assert_eq!(status, 503, "{answer}");
    assert!(answer.contains("not applied"), "{answer}");
    // A load balancer is told to route around this replica.
    let (status, _, body) = a.admin_call("GET", "/readyz", "").await;
    assert_eq!(
        (status, body.contains("state_unavailable")),
        (503, true),
        "{body}"
    );

    // Redis back, empty (it kept nothing): the broker reconnects by itself. Revocations made
    // before may be gone with the data, so the tokens issued before are refused; new ones work.
    let _redis = Redis::start_on(port).unwrap();
    a_fresh_token_works(
        &a,
        Duration::from_secs(10),
        "no recovery once Redis was back",
    )
    .await;
    assert_eq!(
        a.status("GET", TARGET, &token).await,
        401,
        "issued before the loss"
    );
    assert_eq!(a.admin_call("GET", "/readyz", "").await.0, 200);
    // The deferred revocation was made in the new Redis, and audited under its request id.
    let key = format!("credbroker:revoked:jti:{}", jti_of(&token));
    assert_eq!(redis_command(port, &["EXISTS", &key]).trim_end(), ":1");
    assert_deferred_then_made(&a, "revoke").await;
}

/// `broker`'s log shows `action` asked for once and deferred, then made: two `admin` records,
/// `deferred` then `ok`, with one request id and actor.
async fn assert_deferred_then_made(broker: &TestBroker, action: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let steps: Vec<_> = events(&broker.audit(), "admin")
            .into_iter()
            .filter(|r| r["action"] == action)
            .map(|r| {
                (
                    r["result"].clone(),
                    r["request_id"].clone(),
                    r["actor"].clone(),
                )
            })
            .collect();
        if steps.len() == 2 {
            assert_eq!(
                (&steps[0].0, &steps[1].0),
                (&"deferred".into(), &"ok".into())
            );
            assert_eq!(steps[0].1, steps[1].1, "one request id for both steps");
            assert_eq!(steps[0].2, steps[1].2, "the asking actor on both");
            return;
        }
        assert!(
            steps.len() < 2 && Instant::now() < deadline,
            "{action}: {steps:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Makes `redis` a replica of a primary that is not there: reads are answered, writes refused
/// `READONLY` (what a node demoted by a failover answers).
fn read_only(redis: &Redis) {
    let nowhere = TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere_port = nowhere.local_addr().unwrap().port().to_string();
    drop(nowhere);
    assert!(
        redis_command(redis.port, &["REPLICAOF", "127.0.0.1", &nowhere_port]).starts_with("+OK")
    );
}

/// Makes `redis` a primary again ([`read_only`] undone).
fn writable(redis: &Redis) {
    assert!(redis_command(redis.port, &["REPLICAOF", "NO", "ONE"]).starts_with("+OK"));
}

/// Sends one command to Redis (RESP), returns the first reply line.
fn redis_command(port: u16, args: &[&str]) -> String {
    use std::io::{BufRead, BufReader, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut cmd = format!("*{}\r\n", args.len());
    for a in args {
        cmd.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    stream.write_all(cmd.as_bytes()).unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    // A bulk string (`$<len>`): its value is the next line.
    if line.starts_with('$') && !line.starts_with("$-1") {
        reader.read_line(&mut line).unwrap();
    }
    line
}

#[tokio::test]
async fn redis_losing_its_data_undoes_no_revocation_and_no_kill_switch() {
    let Some(redis) = Redis::start() else { return };
    let up = FakeUpstream::start().await;
    let (_keys, a, b) = two_replicas(&redis, &up, |c| c).await;
    let revoked = a.token("github:issues.read", &[]).await;
    let body = jti_body(&jti_of(&revoked));
    assert_eq!(a.admin_call("POST", "/v1/revoke", &body).await.0, 200);
    let once = a.token("github:issues.read", &[("max_uses", "1")]).await;
    assert_eq!(b.status("GET", TARGET, &once).await, 200);
    let (status, _, _) = a.admin_call("POST", "/v1/revoke", GITHUB).await;
    assert_eq!(status, 200);
    // Each replica copies the kill switches in force into its journal every 2 s.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    assert!(redis_command(redis.port, &["FLUSHALL"]).starts_with("+OK"));

    // `b` notices first: nothing issued up to the new epoch's cut-off (its second plus the 1 s
    // skew allowance) passes, so the token request waits for the cut-off to pass — and then
    // finds that what `a` switched off stays off.
    let asked = std::time::Instant::now();
    let (status, _, body) = b
        .token_request("bot", SECRET, "github:issues.read", &[])
        .await;
    assert!(
        asked.elapsed() >= Duration::from_millis(900),
        "waited for the cut-off"
    );
    assert_eq!(status, 400, "kill switch restored: {body}");
    assert!(body.contains("invalid_scope"), "{body}");
    for token in [&revoked, &once] {
        for broker in [&a, &b] {
            assert_eq!(broker.status("GET", TARGET, token).await, 401);
        }
    }
    let (status, _, _) = b.admin_call("POST", "/v1/enable", GITHUB).await;
    assert_eq!(status, 200);
    let fresh = b.token("github:issues.read", &[]).await;
    assert_eq!(a.status("GET", TARGET, &fresh).await, 200);
    assert_eq!(up.count(), 2);
}

#[tokio::test]
async fn a_redis_password_put_right_is_picked_up_without_a_restart() {
    let Some(redis) = Redis::start() else { return };
    assert!(
        redis_command(redis.port, &["CONFIG", "SET", "requirepass", "old-pw"]).starts_with("+OK")
    );
    let up = FakeUpstream::start().await;
    let (_keys, a, _b) = two_replicas(&redis, &up, |c| {
        c.replace("url = \"redis://", "url = \"redis://:new-pw@")
    })
    .await;
    let (status, _, body) = a
        .token_request("bot", SECRET, "github:issues.read", &[])
        .await;
    assert_eq!(status, 503, "{body}");
    assert!(!body.contains("new-pw"), "{body}");
    // The password is rotated in Redis: the broker catches up by itself.
    let rotate = {
        use std::io::{BufRead, BufReader, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", redis.port)).unwrap();
        s.write_all(b"AUTH old-pw\r\nCONFIG SET requirepass new-pw\r\n")
            .unwrap();
        let mut r = BufReader::new(s);
        let (mut l1, mut l2) = (String::new(), String::new());
        r.read_line(&mut l1).unwrap();
        r.read_line(&mut l2).unwrap();
        l1 + &l2
    };
    assert_eq!(rotate, "+OK\r\n+OK\r\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    while a
        .token_request("bot", SECRET, "github:issues.read", &[])
        .await
        .0
        != 200
    {
        assert!(
            Instant::now() < deadline,
            "still refused after the password was put right"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn check_names_redis_url_problems_without_quoting_the_url() {
    let dir = tempfile::tempdir().unwrap();
    let base = standard_config("127.0.0.1:9".parse().unwrap());
    let run = |state: &str| {
        let path = dir.path().join("credbroker.toml");
        std::fs::write(&path, format!("{base}\n[state]\n{state}\n")).unwrap();
        let out = Command::new(BIN)
            .args(["check", "--config", path.to_str().unwrap()])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = run("backend = \"redis\"");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("state.url"), "{out}");
    let (code, out) = run("backend = \"redis\"\nurl = \"rediss://:s3cret-pw@10.1.2.3\"");
    assert_eq!(code, Some(1), "{out}");
    assert!(
        !out.contains("s3cret-pw") && !out.contains("10.1.2.3"),
        "{out}"
    );
    let (code, out) = run("backend = \"redis\"\nurl = \"redis://:s3cret-pw@10.1.2.3:6379\"");
    assert_eq!(code, Some(0), "warnings only: {out}");
    assert!(out.contains("holds a password"), "{out}");
    assert!(out.contains("unencrypted"), "{out}");
    assert!(!out.contains("s3cret-pw"), "{out}");
    let (code, out) = run("backend = \"etcd\"");
    assert_eq!(code, Some(1), "{out}");
    let (code, out) = run("url = \"redis://127.0.0.1\"");
    assert_eq!(code, Some(1), "a url without the redis backend: {out}");
    // A journal that does not parse: serve starts an empty one, check says what that costs.
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("shared-r0.json"), "{\"epoch\": tru").unwrap();
    let (code, out) = run("backend = \"redis\"\nurl = \"redis://127.0.0.1:6379\"");
    assert_eq!(code, Some(0), "a warning: {out}");
    assert!(
        out.contains("warning") && out.contains("shared-r0.json") && out.contains("corrupt"),
        "{out}"
    );
}

#[tokio::test]
async fn redis_going_back_to_older_data_undoes_nothing_either() {
    let Some(redis) = Redis::start() else { return };
    let up = FakeUpstream::start().await;
    let (_keys, a, b) = two_replicas(&redis, &up, |c| c).await;
    let revoked = a.token("github:issues.read", &[]).await;
    let jti = jti_of(&revoked);
    let body = jti_body(&jti);
    assert_eq!(a.admin_call("POST", "/v1/revoke", &body).await.0, 200);
    let (status, _, _) = a.admin_call("POST", "/v1/revoke", GITHUB).await;
    assert_eq!(status, 200);
    // Both replicas have looked at the counter (the watch, every 2 s).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // A restore from an older snapshot, or a failover to a replica that lagged: the epoch is
    // still there, the latest changes are not, and the change counter is back where it was.
    let port = redis.port;
    let key = format!("credbroker:revoked:jti:{jti}");
    assert!(redis_command(port, &["DEL", &key]).starts_with(":1"));
    assert!(redis_command(port, &["HDEL", "credbroker:switches", "github"]).starts_with(":1"));
    assert!(redis_command(port, &["SET", "credbroker:generation", "0"]).starts_with("+OK"));
    // New changes do not paper over it (they would bring the counter back up).
    for other in ["x1", "x2", "x3"] {
        let body = jti_body(other);
        assert_eq!(b.admin_call("POST", "/v1/revoke", &body).await.0, 200);
    }

    // `a` saw the newer state: it notices (at its next call or watch round), refuses what was
    // issued before, and restores the kill switch from its journal.
    assert_eq!(a.status("GET", TARGET, &revoked).await, 401);
    tokio::time::sleep(Duration::from_millis(2100)).await; // past the new epoch's cut-off
    let (status, _, body) = b
        .token_request("bot", SECRET, "github:issues.read", &[])
        .await;
    assert_eq!(status, 400, "kill switch restored: {body}");
    assert_eq!(b.status("GET", TARGET, &revoked).await, 401);
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn a_redis_that_may_evict_keys_is_not_trusted() {
    let Some(redis) = Redis::start() else { return };
    let up = FakeUpstream::start().await;
    let (_keys, a, _b) = two_replicas(&redis, &up, |c| c).await;
    let token = a.token("github:issues.read", &[]).await;
    assert_eq!(a.status("GET", TARGET, &token).await, 200);
    let port = redis.port;
    for (k, v) in [("maxmemory", "100mb"), ("maxmemory-policy", "allkeys-lru")] {
        assert!(redis_command(port, &["CONFIG", "SET", k, v]).starts_with("+OK"));
    }
    // Noticed within a watch round (2 s): every call is refused, and /readyz says so.
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        let (status, _, body) = a.call("GET", TARGET, &token).await;
        if status == 503 {
            assert!(body.contains("state_unavailable"), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "an evicting Redis is still trusted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(a.admin_call("GET", "/readyz", "").await.0, 503);
    assert!(
        redis_command(port, &["CONFIG", "SET", "maxmemory-policy", "noeviction"])
            .starts_with("+OK")
    );
    // Trusted again, in a new epoch: keys may have been evicted meanwhile, so what was issued
    // before is refused, and new tokens (past the cut-off) work.
    a_fresh_token_works(
        &a,
        Duration::from_secs(10),
        "not trusted again once it cannot evict",
    )
    .await;
    assert_eq!(a.status("GET", TARGET, &token).await, 401);
}

#[tokio::test]
async fn a_replica_started_after_redis_went_back_notices() {
    let Some(redis) = Redis::start() else { return };
    let up = FakeUpstream::start().await;
    let (_keys, mut a, _b) = two_replicas(&redis, &up, |c| c).await;
    let revoked = a.token("github:issues.read", &[]).await;
    let jti = jti_of(&revoked);
    let body = jti_body(&jti);
    assert_eq!(a.admin_call("POST", "/v1/revoke", &body).await.0, 200);
    // `a` stops; meanwhile Redis goes back to data from before the revocation.
    a.stop().await;
    let dir = std::mem::replace(&mut a.dir, tempfile::tempdir().unwrap());
    let key = format!("credbroker:revoked:jti:{jti}");
    assert!(redis_command(redis.port, &["DEL", &key]).starts_with(":1"));
    assert!(redis_command(redis.port, &["SET", "credbroker:generation", "0"]).starts_with("+OK"));
    // `a` starts again with its journal, which remembers the higher counter.
    let text = std::fs::read_to_string(dir.path().join("credbroker.toml")).unwrap();
    let again = TestBroker::start_in(&text, dir).await;
    assert_eq!(again.status("GET", TARGET, &revoked).await, 401);
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn busy_healthy_replicas_never_think_redis_went_back() {
    let Some(redis) = Redis::start() else { return };
    let up = FakeUpstream::start().await;
    let (_keys, a, b) = two_replicas(&redis, &up, |c| c).await;
    let early = a.token("github:issues.read", &[]).await;
    // Every call with a max_uses token raises the change counter, on both replicas at once,
    // across several watch rounds (2 s each).
    let (a, b) = (std::sync::Arc::new(a), std::sync::Arc::new(b));
    let until = Instant::now() + Duration::from_millis(5500);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let broker = std::sync::Arc::clone(if i % 2 == 0 { &a } else { &b });
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                let token = broker
                    .token("github:issues.read", &[("max_uses", "5")])
                    .await;
                for _ in 0..5 {
                    assert_eq!(broker.status("GET", TARGET, &token).await, 200);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // No false alarm started a new epoch: a token from before still passes on both.
    assert_eq!(a.status("GET", TARGET, &early).await, 200);
    assert_eq!(b.status("GET", TARGET, &early).await, 200);
}

#[tokio::test]
async fn a_revocation_lost_without_a_trace_comes_back_from_the_journal() {
    let Some(redis) = Redis::start() else { return };
    let up = FakeUpstream::start().await;
    let (_keys, a, b) = two_replicas(&redis, &up, |c| c).await;
    let revoked = a.token("github:issues.read", &[]).await;
    let jti = jti_of(&revoked);
    let body = jti_body(&jti);
    assert_eq!(a.admin_call("POST", "/v1/revoke", &body).await.0, 200);
    // Gone from Redis with no counter falling (a shallow rollback that other replicas' changes
    // have covered since): `a`'s journal puts it back within a watch round.
    let key = format!("credbroker:revoked:jti:{jti}");
    assert!(redis_command(redis.port, &["DEL", &key]).starts_with(":1"));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for broker in [&a, &b] {
        assert_eq!(broker.status("GET", TARGET, &revoked).await, 401);
    }
    assert_eq!(up.count(), 0);
}

/// Every replica given refuses a token for the switched-off `github`.
async fn assert_github_switched_off(replicas: &[&TestBroker]) {
    for broker in replicas {
        let (status, _, body) = broker
            .token_request("bot", SECRET, "github:issues.read", &[])
            .await;
        assert_eq!(status, 400, "still switched off: {body}");
    }
}

#[tokio::test]
async fn the_latest_kill_switch_stays_in_force_across_watch_rounds() {
    let Some(redis) = Redis::start() else { return };
    let up = FakeUpstream::start().await;
    let (_keys, a, b) = two_replicas(&redis, &up, |c| c).await;
    assert_eq!(a.admin_call("POST", "/v1/revoke", GITHUB).await.0, 200);
    assert_eq!(b.admin_call("POST", "/v1/enable", GITHUB).await.0, 200);
    assert_eq!(a.admin_call("POST", "/v1/revoke", GITHUB).await.0, 200);
    // Both replicas copy and re-seed their journals meanwhile: `b`'s enable is older than
    // `a`'s last switch-off (their order is Redis's, not the replicas' clocks).
    tokio::time::sleep(Duration::from_millis(4500)).await;
    assert_github_switched_off(&[&a, &b]).await;
}

/// A replica that was down while Redis lost its data comes back with a journal from before
/// the loss, whose counters can be higher than the new ones: its old "switched on" must not
/// undo a switch-off made since the loss.
#[tokio::test]
async fn a_stale_journal_does_not_undo_a_kill_switch_made_since_the_loss() {
    let Some(redis) = Redis::start() else { return };
    let up = FakeUpstream::start().await;
    let (_keys, a, mut b) = two_replicas(&redis, &up, |c| c).await;
    // `b` raises the counter well past anything `a` has seen, ending with github on.
    for _ in 0..6 {
        let token = b.token("github:issues.read", &[]).await;
        let body = jti_body(&jti_of(&token));
        assert_eq!(b.admin_call("POST", "/v1/revoke", &body).await.0, 200);
    }
    assert_eq!(b.admin_call("POST", "/v1/revoke", GITHUB).await.0, 200);
    assert_eq!(b.admin_call("POST", "/v1/enable", GITHUB).await.0, 200);
    b.stop().await;
    let b_dir = std::mem::replace(&mut b.dir, tempfile::tempdir().unwrap());

    assert!(redis_command(redis.port, &["FLUSHALL"]).starts_with("+OK"));
    // `a` carries on after the loss and switches github off.
    tokio::time::sleep(Duration::from_millis(2500)).await; // its watch adopts a new epoch
    assert_eq!(a.admin_call("POST", "/v1/revoke", GITHUB).await.0, 200);

    // `b` comes back with its journal (github on, at a higher counter) and seeds Redis.
    let text = std::fs::read_to_string(b_dir.path().join("credbroker.toml")).unwrap();
    let b = TestBroker::start_in(&text, b_dir).await;
    tokio::time::sleep(Duration::from_millis(4500)).await; // two watch rounds of both
    assert_github_switched_off(&[&a, &b]).await;
    let switch = redis_command(redis.port, &["HGET", "credbroker:switches", "github"]);
    assert!(switch.contains("\r\n1:"), "off in Redis: {switch:?}");
}

/// Redis goes back to older data, losing `a`'s last switch-on; before anyone notices, `b`
/// switches the connector off, at a counter below the lost change's (the rollback hands the
/// lost counters out again). Once the rollback is noticed the journals re-seed Redis: the two
/// changes' order is lost with it, and the switch-off must win.
#[tokio::test]
async fn a_switch_off_made_after_a_rollback_survives_the_re_seeding() {
    let Some(redis) = Redis::start() else { return };
    let up = FakeUpstream::start().await;
    let (_keys, a, b) = two_replicas(&redis, &up, |c| c).await;
    assert_eq!(a.admin_call("POST", "/v1/revoke", GITHUB).await.0, 200);
    tokio::time::sleep(Duration::from_millis(2500)).await; // both replicas see that counter
    let generation = redis_command(redis.port, &["GET", "credbroker:generation"]);
    let generation = generation.lines().nth(1).unwrap().to_owned();
    let switched_off = redis_command(redis.port, &["HGET", "credbroker:switches", "github"]);
    let switched_off = switched_off.lines().nth(1).unwrap().to_owned();
    // `a` switches on, off and on again: its journal holds the last "on", at counter + 3.
    for path in ["/v1/enable", "/v1/revoke", "/v1/enable"] {
        assert_eq!(a.admin_call("POST", path, GITHUB).await.0, 200);
    }
    // The rollback: back to the switch-off and its counter.
    let port = redis.port;
    assert!(redis_command(
        port,
        &["HSET", "credbroker:switches", "github", &switched_off]
    )
    .starts_with(':'));
    assert!(redis_command(port, &["SET", "credbroker:generation", &generation]).starts_with("+OK"));
    // `b` has not seen `a`'s changes: its switch-off is accepted, at counter + 1.
    assert_eq!(b.admin_call("POST", "/v1/revoke", GITHUB).await.0, 200);

    tokio::time::sleep(Duration::from_millis(4500)).await; // noticed, re-seeded, copied
    tokio::time::sleep(Duration::from_millis(2100)).await; // past the new epoch's cut-off
    assert_github_switched_off(&[&a, &b]).await;
}

/// A replica restarted under another name (its host name, new with each container) over the
/// same state folder, after Redis lost its data: the old name's journal still counts, so the
/// loss is not taken for a first start — the kill switch stays on and the revoked token
/// stays refused.
#[tokio::test]
async fn a_renamed_replica_keeps_what_its_old_journal_knew_across_a_redis_loss() {
    let Some(redis) = Redis::start() else { return };
    let up = FakeUpstream::start().await;
    let keys = tempfile::tempdir().unwrap();
    let key = keygen_signing_key(keys.path());
    let mut a = TestBroker::start(&replica_config(up.addr, &key, &redis, "a")).await;
    let revoked = a.token("github:issues.read", &[]).await;
    let body = jti_body(&jti_of(&revoked));
    assert_eq!(a.admin_call("POST", "/v1/revoke", &body).await.0, 200);
    assert_eq!(a.admin_call("POST", "/v1/revoke", GITHUB).await.0, 200);
    // The journal copies the kill switches in force every 2 s.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    a.stop().await;
    let dir = std::mem::replace(&mut a.dir, tempfile::tempdir().unwrap());
    assert!(redis_command(redis.port, &["FLUSHALL"]).starts_with("+OK"));

    let renamed = replica_config(up.addr, &key, &redis, "a2");
    let again = TestBroker::start_in(&renamed, dir).await;
    // Past the new epoch's cut-off (its second plus the 1 s skew allowance).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_github_switched_off(&[&again]).await;
    assert_eq!(again.status("GET", TARGET, &revoked).await, 401);
    assert_eq!(up.count(), 0);
}

/// A replica that has not reached Redis since it started (Redis hung or down when it came up)
/// answers the calls that need Redis within the bound each, all at once: they share the
/// attempt under way to reach it rather than each waiting for the one before (20 requests
/// were answered one second apart, the last after 20 s).
#[tokio::test]
async fn a_replica_that_never_reached_redis_answers_concurrent_requests_in_bounded_time() {
    // Accepts connections and never answers: every attempt waits its full second.
    let hung = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("redis://{}/0", hung.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in hung.incoming().flatten() {
            held.push(stream);
        }
    });
    let up = FakeUpstream::start().await;
    let config = format!(
        "{}\n[state]\nbackend = \"redis\"\nurl = \"{url}\"\nreplica = \"r\"\n",
        standard_config(up.addr)
    );
    let b = TestBroker::start(&config).await;
    let started = Instant::now();
    let requests = (0..20).map(|_| b.token_request("bot", SECRET, "github:issues.read", &[]));
    let answers = futures_util::future::join_all(requests).await;
    let took = started.elapsed();
    for (status, _, body) in answers {
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("state_unavailable"), "{body}");
    }
    assert!(took < Duration::from_secs(5), "20 requests took {took:?}");
}

/// A Redis that stops taking writes (a replica after a failover, out of memory under
/// `noeviction`) would leave revocations and kill switches impossible to make while calls
/// whose decision only reads (no `max_uses`, no rate limit) went on being forwarded: every
/// call is refused 503 instead, `/readyz` says so, and both come back once it takes writes.
#[tokio::test]
async fn a_redis_that_refuses_writes_stops_the_calls_it_could_not_revoke() {
    let Some(redis) = Redis::start() else { return };
    let up = FakeUpstream::start().await;
    let (_keys, a, _b) = two_replicas(&redis, &up, |c| c).await;
    let token = a.token("github:issues.read", &[]).await;
    assert_eq!(a.status("GET", TARGET, &token).await, 200);
    // A replica of a primary that is not there: reads are answered, writes refused READONLY.
    read_only(&redis);
    let (status, _, body) = a.admin_call("POST", "/v1/enable", GITHUB).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("not applied"), "{body}");
    let refused = |status: u16| status == 503;
    let deadline = Instant::now() + Duration::from_secs(6);
    while !refused(a.status("GET", TARGET, &token).await) {
        assert!(
            Instant::now() < deadline,
            "calls still forwarded while Redis refuses writes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let forwarded = up.count();
    let (status, _, body) = a.call("GET", TARGET, &token).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("state_unavailable"), "{body}");
    assert_eq!(up.count(), forwarded, "nothing forwarded");
    let (status, _, body) = a.admin_call("GET", "/readyz", "").await;
    assert_eq!(
        (status, body.contains("state_unavailable")),
        (503, true),
        "{body}"
    );

    writable(&redis);
    let deadline = Instant::now() + Duration::from_secs(6);
    while a.status("GET", TARGET, &token).await != 200 {
        assert!(
            Instant::now() < deadline,
            "no recovery once Redis took writes again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(a.admin_call("GET", "/readyz", "").await.0, 200);
    let (status, _, body) = a.admin_call("POST", "/v1/revoke", GITHUB).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(a.status("GET", TARGET, &token).await, 403);
    let (status, _, body) = a.admin_call("POST", "/v1/enable", GITHUB).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(a.status("GET", TARGET, &token).await, 200);

    // Noticed without anyone trying a write: each watch round tries one.
    read_only(&redis);
    let deadline = Instant::now() + Duration::from_secs(8);
    while !refused(a.status("GET", TARGET, &token).await) {
        assert!(
            Instant::now() < deadline,
            "a read-only Redis went unnoticed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    writable(&redis);
}

/// The new epoch owed once Redis stops evicting (keys may have gone) is not lost when the
/// round that noticed cannot make it — switching to `noeviction` at `maxmemory` makes that
/// round's resync fail with OOM: calls stay refused until it is made, and a token issued
/// before is refused after.
#[tokio::test]
async fn the_new_epoch_owed_after_eviction_survives_a_failed_resync() {
    let Some(redis) = Redis::start() else { return };
    let up = FakeUpstream::start().await;
    let (_keys, a, _b) = two_replicas(&redis, &up, |c| c).await;
    let token = a.token("github:issues.read", &[]).await;
    assert_eq!(a.status("GET", TARGET, &token).await, 200);
    let port = redis.port;
    let set = |args: &[&str]| {
        let mut all = vec!["CONFIG", "SET"];
        all.extend_from_slice(args);
        assert!(redis_command(port, &all).starts_with("+OK"));
    };
    set(&["maxmemory", "100mb", "maxmemory-policy", "allkeys-lru"]);
    let deadline = Instant::now() + Duration::from_secs(6);
    while a.status("GET", TARGET, &token).await != 503 {
        assert!(
            Instant::now() < deadline,
            "an evicting Redis is still trusted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // No longer evicting, but full: the round that notices cannot start the new epoch.
    set(&["maxmemory-policy", "noeviction", "maxmemory", "1"]);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(a.status("GET", TARGET, &token).await, 503);
    set(&["maxmemory", "0"]);
    a_fresh_token_works(
        &a,
        Duration::from_secs(10),
        "not trusted again once it takes writes",
    )
    .await;
    assert_eq!(
        a.status("GET", TARGET, &token).await,
        401,
        "issued before the new epoch"
    );
}

/// A TCP forwarder on loopback whose target can be switched for new connections: what a
/// failover behind a DNS name, VIP or proxy looks like to a client.
struct Forwarder {
    addr: SocketAddr,
    target: std::sync::Arc<std::sync::Mutex<SocketAddr>>,
}

impl Forwarder {
    async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let target = std::sync::Arc::new(std::sync::Mutex::new(target));
        let current = std::sync::Arc::clone(&target);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let to = *current.lock().unwrap();
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Self { addr, target }
    }

    fn switch_to(&self, target: SocketAddr) {
        *self.target.lock().unwrap() = target;
    }
}

/// After a failover behind one address the old primary, now a replica, refuses writes on the
/// connection the broker holds (READONLY): the broker connects again, reaches the new
/// primary, and decides calls again — not 503 until a restart.
#[tokio::test]
async fn a_failover_behind_one_address_is_followed() {
    let Some(old) = Redis::start() else { return };
    let Some(new) = Redis::start() else { return };
    let at = |r: &Redis| -> SocketAddr { format!("127.0.0.1:{}", r.port).parse().unwrap() };
    let forwarder = Forwarder::start(at(&old)).await;
    let up = FakeUpstream::start().await;
    let keys = tempfile::tempdir().unwrap();
    let key = keygen_signing_key(keys.path());
    let url = format!("redis://{}/0", forwarder.addr);
    let a = TestBroker::start(&replica_config_at(up.addr, &key, &url, "a")).await;
    let token = a.token("github:issues.read", &[]).await;
    assert_eq!(a.status("GET", TARGET, &token).await, 200);
    // The failover: the new node takes over, the old one follows it, the address moves.
    let new_port = new.port.to_string();
    assert!(redis_command(old.port, &["REPLICAOF", "127.0.0.1", &new_port]).starts_with("+OK"));
    forwarder.switch_to(at(&new));
    // The first write lands on the old node and is refused (READONLY): kept (503, `"kept":
    // true`), and the broker connects again — to the new primary, where the next admin
    // change makes it first.
    let revoke_old = jti_body(&jti_of(&token));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, body) = a.admin_call("POST", "/v1/revoke", &revoke_old).await;
        if status == 200 {
            break;
        }
        assert!(status == 503 && body.contains("\"kept\":true"), "{body}");
        assert!(
            Instant::now() < deadline,
            "still not following the failover: {body}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Calls are decided there: a new token works, and a kill switch holds.
    let fresh = a_fresh_token_works(
        &a,
        Duration::from_secs(10),
        "no calls decided after the failover",
    )
    .await;
    let (status, _, body) = a.admin_call("POST", "/v1/revoke", GITHUB).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        a.status("GET", TARGET, &fresh).await,
        403,
        "the kill switch holds"
    );
}

/// A kill switch asked for while Redis cannot take it (here: read-only) is not lost: answered
/// 503 with `"kept": true` and audited `deferred`, kept in the replica's journal, and made once Redis takes writes again —
/// by that replica's own watch round, no call needed — so the other replica refuses the
/// connector too. The log shows both steps under the asking call's request id.
#[tokio::test]
async fn a_kill_switch_redis_could_not_take_is_made_once_it_can() {
    let Some(redis) = Redis::start() else { return };
    let up = FakeUpstream::start().await;
    let (_keys, a, b) = two_replicas(&redis, &up, |c| c).await;
    let on_a = a.token("github:issues.read", &[]).await;
    let on_b = b.token("github:issues.read", &[]).await;
    assert_eq!(a.status("GET", TARGET, &on_a).await, 200);
    assert_eq!(b.status("GET", TARGET, &on_b).await, 200);
    read_only(&redis);
    let (status, _, body) = a.admin_call("POST", "/v1/revoke", GITHUB).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"kept\":true"), "{body}");
    let journal = std::fs::read_to_string(a.dir.path().join("state/shared-a.json")).unwrap();
    assert!(journal.contains("\"deferred\""), "kept on disk: {journal}");
    let (_, _, metrics) = a.admin_call("GET", "/metrics", "").await;
    assert!(
        metrics.contains("credbroker_state_deferred_changes 1"),
        "{metrics}"
    );
    assert_eq!(
        a.status("GET", TARGET, &on_a).await,
        503,
        "nothing decided meanwhile"
    );

    writable(&redis);
    let deadline = Instant::now() + Duration::from_secs(8);
    while b.status("GET", TARGET, &on_b).await != 403 {
        assert!(
            Instant::now() < deadline,
            "the deferred kill switch never reached the other replica"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(a.status("GET", TARGET, &on_a).await, 403);
    let journal = std::fs::read_to_string(a.dir.path().join("state/shared-a.json")).unwrap();
    assert!(
        !journal.contains("\"deferred\""),
        "made, so no longer kept: {journal}"
    );
    assert_deferred_then_made(&a, "disable").await;
    let (_, _, metrics) = a.admin_call("GET", "/metrics", "").await;
    assert!(
        metrics.contains("credbroker_state_deferred_changes 0"),
        "{metrics}"
    );

    let (status, _, body) = b.admin_call("POST", "/v1/enable", GITHUB).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(a.status("GET", TARGET, &on_a).await, 200);
}

/// An enable asked as Redis comes back, while a kill switch deferred in the outage is not made
/// yet: the switch-off is made (and audited) first, then the enable — the log ends as Redis
/// does, with the connector enabled.
#[tokio::test]
async fn an_enable_after_an_outage_comes_after_the_kill_switch_deferred_in_it() {
    let Some(redis) = Redis::start() else { return };
    let up = FakeUpstream::start().await;
    let (_keys, a, _b) = two_replicas(&redis, &up, |c| c).await;
    let port = redis.port;
    drop(redis);
    let (status, _, body) = a.admin_call("POST", "/v1/revoke", GITHUB).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"kept\":true"), "{body}");
    let _redis = Redis::start_on(port).unwrap();
    // Straight away, well within the replica's 2 s watch round (a first attempt may find the
    // connection still being remade).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, body) = a.admin_call("POST", "/v1/enable", GITHUB).await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "enable never made: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Attempts made while the connection was remade (`failed`, `unconfirmed`) left out.
    let steps: Vec<(String, String)> = events(&a.audit(), "admin")
        .into_iter()
        .filter(|r| r["result"] == "deferred" || r["result"] == "ok")
        .map(|r| {
            let text = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
            (text("action"), text("result"))
        })
        .collect();
    let expected = [("disable", "deferred"), ("disable", "ok"), ("enable", "ok")];
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(a, r)| ((*a).to_owned(), (*r).to_owned()))
        .collect();
    assert_eq!(steps, expected);
    a_fresh_token_works(&a, Duration::from_secs(10), "the connector stays disabled").await;
}

/// A replica stopped while a kill switch waits for Redis, and started again under another name
/// (the host name, new with every container) with the same `state.dir`, makes it.
#[tokio::test]
async fn a_deferred_kill_switch_survives_a_restart_under_a_new_name() {
    let Some(redis) = Redis::start() else { return };
    let up = FakeUpstream::start().await;
    let (keys, mut a, b) = two_replicas(&redis, &up, |c| c).await;
    let port = redis.port;
    drop(redis);
    let (status, _, body) = a.admin_call("POST", "/v1/revoke", GITHUB).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"kept\":true"), "{body}");
    a.stop().await;
    let dir = std::mem::replace(&mut a.dir, tempfile::tempdir().unwrap());
    let _redis = Redis::start_on(port).unwrap();
    let key = keys.path().join("signing.pem");
    let url = format!("redis://127.0.0.1:{port}/0");
    let renamed = replica_config_at(up.addr, &key, &url, "a-2");
    let _a2 = TestBroker::start_in(&renamed, dir).await;
    // b (Redis came back empty: a new epoch) refuses the connector once a-2 made the switch:
    // no token for it, or a token's call refused.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, body) = b
            .token_request("bot", SECRET, "github:issues.read", &[])
            .await;
        if status == 400 && body.contains("disabled") {
            break;
        }
        if status == 200 {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            let fresh = v["access_token"].as_str().unwrap().to_owned();
            if b.status("GET", TARGET, &fresh).await == 403 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the kill switch asked of the old name was never made: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
