//! DESIGN §5 / §6: the chain rule recomputed from the file, and 503 when it cannot be written.

use std::time::Duration;

use crate::support::*;

#[tokio::test]
async fn the_chain_verifies_independently() {
    let up = FakeUpstream::start().await;
    let mut b = TestBroker::start(&standard_config(up.addr)).await;
    let token = b.token("github:issues.read", &[]).await;
    b.call("GET", "/github/repos/acme/widget/issues", &token)
        .await;
    b.call("DELETE", "/github/repos/acme/widget", &token).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.stop().await;
    let n = verify_chain_independently(&b.audit_path());
    let records = b.audit();
    assert_eq!(n, records.len());
    let kinds: Vec<&str> = records
        .iter()
        .map(|r| r["event"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.first(), Some(&"startup"));
    assert_eq!(kinds.last(), Some(&"shutdown"));
    for k in ["token_issued", "proxy", "proxy_result"] {
        assert!(kinds.contains(&k), "{k} in {kinds:?}");
    }
    assert_eq!(records[0]["seq"], 1);
    assert_eq!(records[0]["prev"], "0".repeat(64));
    let ts = records[0]["ts"].as_str().unwrap();
    assert!(
        ts.ends_with('Z') && ts.len() == "2026-11-26T05:03:25.123456Z".len(),
        "{ts}"
    );
}

/// A small tmpfs, mounted for the test (needs root, as CI runs); unmounted on drop.
pub(crate) struct Tmpfs(pub(crate) tempfile::TempDir);

impl Tmpfs {
    pub(crate) fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Self(dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

/// Fills the filesystem holding `dir` until a write fails.
fn fill(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write;
    let filler = dir.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    filler
}

/// The standard config with its audit log on `fs`.
fn config_on(fs: &Tmpfs, upstream: std::net::SocketAddr) -> (String, std::path::PathBuf) {
    let audit_path = fs.0.path().join("audit.jsonl");
    let config = standard_config(upstream).replace(
        "path = \"audit.jsonl\"",
        &format!("path = \"{}\"", audit_path.display()),
    );
    (config, audit_path)
}

/// Fills `fs`, then issues tokens until the log is really full (its last page may still have
/// had room): the token endpoint answers 503. Returns the filler file, to free the space.
pub(crate) async fn fill_until_refused(b: &TestBroker, fs: &Tmpfs) -> std::path::PathBuf {
    let filler = fill(fs.0.path());
    for _ in 0..200 {
        let (s, _, _) = b
            .token_request("bot", SECRET, "github:issues.read", &[])
            .await;
        if s == 503 {
            return filler;
        }
        assert_eq!(s, 200);
    }
    panic!("the token endpoint must answer 503 once the audit log cannot be written");
}

#[tokio::test]
async fn full_disk_refuses_with_503_forwards_nothing_and_recovers() {
    let Some(fs) = Tmpfs::mount("256k") else {
        eprintln!(
            "SKIPPED full_disk_refuses_with_503…: mounting a tmpfs needs root (CI runs as root)"
        );
        return;
    };
    let up = FakeUpstream::start().await;
    let (config, audit_path) = config_on(&fs, up.addr);
    let b = TestBroker::start(&config).await;
    let token = b.token("github:issues.read", &[]).await;
    let filler = fill_until_refused(&b, &fs).await;
    let (s, _, body) = b
        .call("GET", "/github/repos/acme/widget/issues", &token)
        .await;
    assert_eq!(s, 503, "{body}");
    assert!(body.contains("audit_unavailable"));
    assert_eq!(up.count(), 0, "nothing forwarded unaudited");
    // DESIGN §4.1, §6: while the log cannot be written the broker refuses with 503, a request
    // it would refuse anyway too (its record cannot be written either).
    let (s, h, body) = b.call("DELETE", "/github/repos/acme/widget", &token).await;
    assert_eq!(
        (s, body.contains("audit_unavailable")),
        (503, true),
        "{body}"
    );
    assert_eq!(
        h["retry-after"], "1",
        "the broker recovers by itself: come back"
    );
    let (s, _, body) = b
        .token_request("bot", "wrong", "github:issues.read", &[])
        .await;
    assert_eq!(
        (s, body.contains("audit_unavailable")),
        (503, true),
        "{body}"
    );
    // A load balancer asking the admin listener is told to route around this replica.
    let readyz = http::Request::get("/readyz").body(String::new()).unwrap();
    let (s, _, body) = send(b.admin.unwrap(), readyz).await;
    assert_eq!(s, 503, "{body}");
    std::fs::remove_file(filler).unwrap();
    let (s, _, body) = b
        .call("GET", "/github/repos/acme/widget/issues", &token)
        .await;
    assert_eq!(s, 200, "recovers by itself once writes succeed: {body}");
    assert_eq!(up.count(), 1);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let n = verify_chain_independently(&audit_path);
    assert!(n >= 3);
    // A clean stop: the `shutdown` record written (`serve` exits 0).
    let mut b = b;
    assert!(b.running.take().unwrap().shutdown().await);
    let records = audit_records(&audit_path);
    assert_eq!(records.last().unwrap()["event"], "shutdown");
}

/// DESIGN §6: SIGTERM writes `shutdown` and exits 0 — and when the disk is full it cannot be
/// written, which the stop reports (`serve` exits 1) instead of passing for a clean one.
#[tokio::test]
async fn a_stop_whose_shutdown_record_cannot_be_written_says_so() {
    let Some(fs) = Tmpfs::mount("256k") else {
        eprintln!("SKIPPED a_stop_whose_shutdown_record…: mounting a tmpfs needs root");
        return;
    };
    let up = FakeUpstream::start().await;
    let (config, audit_path) = config_on(&fs, up.addr);
    let mut b = TestBroker::start(&config).await;
    let _filler = fill_until_refused(&b, &fs).await;
    assert!(!b.running.take().unwrap().shutdown().await);
    let records = audit_records(&audit_path);
    assert_ne!(records.last().unwrap()["event"], "shutdown");
}

/// The README's independent verifier (tools/verify-audit.py) agrees with the broker: intact
/// logs pass, a changed byte fails. Skipped when python3 is missing.
#[tokio::test]
async fn the_python_verifier_from_the_readme_works() {
    if std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: python3 not found");
        return;
    }
    let up = FakeUpstream::start().await;
    let mut b = TestBroker::start(&standard_config(up.addr)).await;
    let token = b.token("github:issues.read", &[]).await;
    b.call("GET", "/github/repos/acme/widget/issues", &token)
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.stop().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/verify-audit.py");
    let run = || {
        std::process::Command::new("python3")
            .arg(script)
            .arg(b.audit_path())
            .output()
            .unwrap()
    };
    let o = run();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let text = std::fs::read_to_string(b.audit_path())
        .unwrap()
        .replacen("bot", "bob", 1);
    std::fs::write(b.audit_path(), text).unwrap();
    let o = run();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stdout).contains("hash mismatch"));
}

/// DESIGN §3.5, §6: admin actions while the audit log cannot be written. A revocation and a
/// kill switch tighten, so they take effect at once but answer 503 (refusing them would keep a
/// leaked token working); enabling a connector loosens, so unaudited it is not done.
#[tokio::test]
async fn admin_actions_on_a_full_disk_tighten_but_never_loosen_unaudited() {
    let Some(fs) = Tmpfs::mount("256k") else {
        eprintln!("SKIPPED admin_actions_on_a_full_disk…: mounting a tmpfs needs root");
        return;
    };
    let up = FakeUpstream::start().await;
    let (config, audit_path) = config_on(&fs, up.addr);
    let b = TestBroker::start(&config).await;
    let token = b.token("github:issues.read", &[]).await;
    let filler = fill_until_refused(&b, &fs).await;
    let (s, _, body) = b
        .admin_call("POST", "/v1/revoke", "{\"connector\":\"github\"}")
        .await;
    assert_eq!(s, 503, "{body}");
    assert!(
        body.contains("audit_unavailable") && body.contains("in force"),
        "{body}"
    );
    let (s, _, body) = b
        .admin_call("POST", "/v1/enable", "{\"connector\":\"github\"}")
        .await;
    assert_eq!(s, 503, "{body}");
    assert!(body.contains("stays disabled"), "{body}");
    std::fs::remove_file(filler).unwrap();
    let (s, _, body) = b
        .call("GET", "/github/repos/acme/widget/issues", &token)
        .await;
    assert_eq!(
        s, 403,
        "the kill switch bit and the enable was undone: {body}"
    );
    assert_eq!(
        b.admin_call("POST", "/v1/enable", "{\"connector\":\"github\"}")
            .await
            .0,
        200
    );
    assert_eq!(
        b.status("GET", "/github/repos/acme/widget/issues", &token)
            .await,
        200
    );
    assert_eq!(up.count(), 1);
    // The kill switch that took effect unaudited has its record after all, written with the
    // first batch the disk took, and saying it is late; the chain is whole.
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&audit_path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let disables: Vec<_> = events(&records, "admin")
        .into_iter()
        .filter(|r| r["action"] == "disable")
        .collect();
    assert_eq!(disables.len(), 1, "{records:?}");
    assert_eq!(disables[0]["result"], "ok");
    assert!(disables[0]["error"]
        .as_str()
        .unwrap()
        .contains("recorded late"));
    let denied_by_it = records
        .iter()
        .position(|r| r["reason"] == "connector_disabled")
        .expect("the call the kill switch refused");
    let enable = records
        .iter()
        .position(|r| r["action"] == "enable" && r["result"] == "ok")
        .unwrap();
    let disable = records
        .iter()
        .position(|r| r["action"] == "disable")
        .unwrap();
    assert!(disable < denied_by_it && disable < enable, "{records:?}");
    assert_eq!(verify_chain_independently(&audit_path), records.len());
}

/// The standard config (fsync = "always") with a 1 s `request_timeout`.
fn one_second_requests(upstream: std::net::SocketAddr) -> String {
    standard_config(upstream).replace("request_timeout = \"5s\"", "request_timeout = \"1s\"")
}

/// Holds the broker's audit writer thread in its next syncs while the returned flag is set
/// (at most 10 s each): a disk that stopped answering.
fn stall_syncs(b: &TestBroker) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let stalled = Arc::new(AtomicBool::new(true));
    let hold = Arc::clone(&stalled);
    let audit = &b.running.as_ref().unwrap().broker.audit;
    audit.set_fsync_observer(Arc::new(move |_| {
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while hold.load(Ordering::Relaxed) && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
    }));
    stalled
}

/// DESIGN §6, "bounded everything: per-request time": under `always`, a disk whose
/// `fdatasync` stops returning holds no call past `request_timeout`. The call is answered 503
/// and not forwarded; its allow record, still queued, lands once the disk answers, followed by
/// a `proxy_result` saying nothing was forwarded. A token is refused the same way.
#[tokio::test]
async fn a_disk_that_stops_answering_holds_no_call_past_request_timeout() {
    use std::sync::atomic::Ordering;
    let up = FakeUpstream::start().await;
    let mut b = TestBroker::start(&one_second_requests(up.addr)).await;
    let token = b.token("github:issues.read", &[]).await;
    let stalled = stall_syncs(&b);
    // The first record after this point enters the stall; the calls whose allows follow it
    // wait behind it.
    let started = std::time::Instant::now();
    let calls = (0..3).map(|_| b.call("GET", "/github/repos/acme/widget/issues", &token));
    let answers = futures_util::future::join_all(calls).await;
    let took = started.elapsed();
    let mut request_ids = Vec::new();
    for (s, headers, body) in answers {
        assert_eq!(s, 503, "{body}");
        assert!(body.contains("audit_unavailable"), "{body}");
        request_ids.push(headers["x-request-id"].to_str().unwrap().to_owned());
    }
    assert!(took < Duration::from_secs(3), "answered after {took:?}");
    assert_eq!(up.count(), 0, "nothing forwarded unaudited");
    let (s, _, body) = b
        .token_request("bot", SECRET, "github:issues.read", &[])
        .await;
    assert_eq!(s, 503, "no token while its record is not on disk: {body}");
    assert!(!body.contains("access_token"), "{body}");
    stalled.store(false, Ordering::Relaxed);
    // The disk answers again: calls go through, and the stalled call's records are there.
    let (s, _, body) = b
        .call("GET", "/github/repos/acme/widget/issues", &token)
        .await;
    assert_eq!(s, 200, "{body}");
    b.stop().await;
    let records = b.audit();
    // Each refused call: its allow, then (after it, never before) its outcome.
    for request_id in &request_ids {
        let of_call: Vec<_> = records
            .iter()
            .filter(|r| r["request_id"] == request_id.as_str())
            .collect();
        assert_eq!(of_call.len(), 2, "{of_call:?}");
        assert_eq!(of_call[0]["event"], "proxy");
        assert_eq!(of_call[0]["decision"], "allow");
        assert_eq!(of_call[1]["event"], "proxy_result");
        assert_eq!(of_call[1]["status"], 503);
        assert!(of_call[1]["error"]
            .as_str()
            .unwrap()
            .starts_with("not forwarded"));
    }
    assert_eq!(verify_chain_independently(&b.audit_path()), records.len());
}

/// DESIGN §5: every allowed call gets its `proxy_result`. A client that goes away while its
/// allow record waits for the disk leaves the allow (queued, it is still written) and, behind
/// it, an outcome saying nothing was forwarded.
#[tokio::test]
async fn a_client_gone_while_its_allow_record_waits_leaves_an_outcome_behind_it() {
    use std::sync::atomic::Ordering;
    use tokio::io::AsyncWriteExt;
    let up = FakeUpstream::start().await;
    let mut b = TestBroker::start(&one_second_requests(up.addr)).await;
    let token = b.token("github:issues.read", &[]).await;
    let stalled = stall_syncs(&b);
    let mut client = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    let head = format!(
        "GET /github/repos/acme/widget/issues HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n\r\n"
    );
    client.write_all(head.as_bytes()).await.unwrap();
    // Gone well before request_timeout (1 s), while the allow record is held by the disk;
    // the stall is lifted once the broker has seen the connection end.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(client);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, _, metrics) = b.admin_call("GET", "/metrics", "").await;
        if metrics.contains("\ncredbroker_connections_open{listener=\"proxy\"} 0\n") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the connection never ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stalled.store(false, Ordering::Relaxed);
    b.stop().await;
    assert_eq!(up.count(), 0, "nothing forwarded");
    let records = b.audit();
    let allows: Vec<_> = records
        .iter()
        .filter(|r| r["event"] == "proxy" && r["decision"] == "allow")
        .collect();
    assert_eq!(allows.len(), 1, "{records:?}");
    let request_id = allows[0]["request_id"].as_str().unwrap();
    let of_call: Vec<_> = records
        .iter()
        .filter(|r| r["request_id"] == request_id)
        .collect();
    assert_eq!(of_call.len(), 2, "{of_call:?}");
    assert_eq!(of_call[0]["decision"], "allow");
    assert_eq!(of_call[1]["event"], "proxy_result");
    assert_eq!(of_call[1]["bytes_out"], 0);
    let error = of_call[1]["error"].as_str().unwrap();
    assert!(
        error.starts_with("not forwarded") && error.contains("went away"),
        "{error}"
    );
    assert_eq!(verify_chain_independently(&b.audit_path()), records.len());
}

/// Admin changes on a disk that stopped answering (fsync = "always"): an enable whose record
/// is not acknowledged in time is not made, and the record that follows its late `ok` says so;
/// it does not hold the admin lock for ever, so a kill switch sent next takes effect.
#[tokio::test]
async fn admin_changes_on_a_stalled_disk_are_bounded_and_an_unaudited_enable_is_not_made() {
    use std::sync::atomic::Ordering;
    let up = FakeUpstream::start().await;
    let mut b = TestBroker::start(&one_second_requests(up.addr)).await;
    let token = b.token("github:issues.read", &[]).await;
    let github = "{\"connector\":\"github\"}";
    assert_eq!(b.admin_call("POST", "/v1/revoke", github).await.0, 200);
    let stalled = stall_syncs(&b);
    let started = std::time::Instant::now();
    let (status, _, body) = b.admin_call("POST", "/v1/enable", github).await;
    assert_eq!(status, 503, "{body}");
    let (status, _, body) = b
        .admin_call("POST", "/v1/revoke", "{\"client\":\"bot\"}")
        .await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("in force now"), "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    stalled.store(false, Ordering::Relaxed);
    // bot's tokens are revoked (check 2, before the kill switch's check 3); github stayed off.
    let (status, _, body) = b
        .call("GET", "/github/repos/acme/widget/issues", &token)
        .await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("revoked"), "{body}");
    let (status, _, body) = b
        .token_request("bot", SECRET, "github:issues.read", &[])
        .await;
    assert_ne!(status, 200, "{body}");
    b.stop().await;
    let records = b.audit();
    let enables: Vec<_> = events(&records, "admin")
        .into_iter()
        .filter(|r| r["action"] == "enable")
        .collect();
    assert_eq!(enables.len(), 2, "{enables:?}");
    assert_eq!(enables[0]["result"], "ok");
    assert_eq!(enables[1]["result"], "failed");
    assert!(enables[1]["error"]
        .as_str()
        .unwrap()
        .starts_with("not made"));
    assert_eq!(verify_chain_independently(&b.audit_path()), records.len());
}

/// DESIGN §5: a token never appears in a record — also one sent without `Authorization`,
/// in the path or the query, which the broker refuses (401) before reading it as a token.
#[tokio::test]
async fn a_token_sent_outside_authorization_is_not_recorded() {
    let up = FakeUpstream::start().await;
    let mut b = TestBroker::start(&standard_config(up.addr)).await;
    let token = b.token("github:issues.read", &[]).await;
    for target in [
        format!("/github/repos/acme/widget/issues?token={token}"),
        format!("/github/repos/acme/{token}/issues"),
        format!("/github/repos/acme/widget/issues?state=open&t={token}"),
        format!("/{token}/repos"),
    ] {
        let (s, _, body) = b
            .call_with("GET", &target, "", &[("x-auth-token", &token)], "")
            .await;
        assert_eq!(s, 401, "{body}");
    }
    assert_eq!(
        b.status("GET", "/github/repos/acme/widget/issues", &token)
            .await,
        200
    );
    b.stop().await;
    let log = std::fs::read_to_string(b.audit_path()).unwrap();
    let signature = token.rsplit('.').next().unwrap();
    assert!(
        !log.contains(signature),
        "the token reached the audit log:\n{log}"
    );
    let records = b.audit();
    let missing: Vec<_> = events(&records, "proxy")
        .into_iter()
        .filter(|r| r["decision"] == "deny")
        .map(|r| {
            format!(
                "{}?{}",
                r["path"].as_str().unwrap(),
                r["query"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(
        missing,
        [
            "/repos/acme/widget/issues?token=REDACTED",
            "/repos/acme/REDACTED/issues?",
            "/repos/acme/widget/issues?state=open&t=REDACTED",
            "/repos?",
        ]
    );
    let in_connector = events(&records, "proxy")
        .into_iter()
        .rfind(|r| r["decision"] == "deny")
        .unwrap()
        .clone();
    assert_eq!(in_connector["connector"], "REDACTED");
}

/// The config's `[audit]` settings reach the running writer: with `hmac_key` and a small
/// `rotate_bytes`, `serve` writes a keyed chain across numbered files (`.1` oldest) that
/// `audit verify` passes with the key, in chain order, and fails without it.
#[tokio::test]
async fn served_audit_settings_key_and_rotate_the_chain() {
    let up = FakeUpstream::start().await;
    let config = standard_config(up.addr).replace(
        "fsync = \"always\"",
        "fsync = \"interval\"\nrotate_bytes = 4096\nhmac_key = \"literal:chain-key\"",
    );
    let mut b = TestBroker::start(&config).await;
    let token = b.token("github:issues.read", &[]).await;
    for _ in 0..24 {
        assert_eq!(
            b.status("GET", "/github/repos/acme/widget/issues", &token)
                .await,
            200
        );
    }
    b.stop().await;
    let dir = b.dir.path();
    let mut files: Vec<String> = (1..)
        .map(|n| format!("audit.jsonl.{n}"))
        .take_while(|f| dir.join(f).exists())
        .collect();
    assert!(files.len() >= 3, "rotated: {files:?}");
    files.push("audit.jsonl".into());
    let verify = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_credbroker"))
            .args(["audit", "verify"])
            .args(&files)
            .args(extra)
            .current_dir(dir)
            .output()
            .unwrap()
    };
    let keyed = verify(&["--hmac-key", "literal:chain-key"]);
    assert_eq!(
        keyed.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&keyed.stdout)
    );
    let plain = verify(&["--hmac-key", "literal:other"]);
    assert_eq!(plain.status.code(), Some(1));
    let all: Vec<serde_json::Value> = files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(dir.join(f))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    let seqs: Vec<u64> = all.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(all.last().unwrap()["event"], "shutdown");
}
