//! DESIGN §5 / §6: the chain rule recomputed from the file, and 503 when it cannot be written.

use std::time::Duration;

use crate::support::*;

#[tokio::test]
async fn the_chain_verifies_independently() {
    let up = FakeUpstream::start().await;
    let mut b = TestBroker::start(&standard_config(up.addr)).await;
    let token = b.token("github:issues.read", &[]).await;
    b.call("GET", "/github/repos/acme/widget/issues", &token).await;
    b.call("DELETE", "/github/repos/acme/widget", &token).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.stop().await;
    let n = verify_chain_independently(&b.audit_path());
    let records = b.audit();
    assert_eq!(n, records.len());
    let kinds: Vec<&str> = records.iter().map(|r| r["event"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"startup"));
    assert_eq!(kinds.last(), Some(&"shutdown"));
    for k in ["token_issued", "proxy", "proxy_result"] {
        assert!(kinds.contains(&k), "{k} in {kinds:?}");
    }
    assert_eq!(records[0]["seq"], 1);
    assert_eq!(records[0]["prev"], "0".repeat(64));
    let ts = records[0]["ts"].as_str().unwrap();
    assert!(ts.ends_with('Z') && ts.len() == "2026-11-26T05:03:25.123456Z".len(), "{ts}");
}

#[tokio::test]
async fn unwritable_audit_log_refuses_with_503_and_forwards_nothing() {
    let up = FakeUpstream::start().await;
    let b = TestBroker::start(&standard_config(up.addr)).await;
    let token = b.token("github:issues.read", &[]).await;
    // Make the log unwritable: replace the file by a directory-backed failure. The writer
    // holds an open handle, so simulate a failing device with /dev/full where available.
    b.running.as_ref().unwrap().broker.audit.fail_writes_for_test(true);
    let (s, _, body) = b.call("GET", "/github/repos/acme/widget/issues", &token).await;
    assert_eq!(s, 503, "{body}");
    assert!(body.contains("audit_unavailable"));
    let (s, _, _) = b.token_request("bot", SECRET, "github:issues.read", &[]).await;
    assert_eq!(s, 503, "no token without its audit record");
    assert_eq!(up.count(), 0);
    b.running.as_ref().unwrap().broker.audit.fail_writes_for_test(false);
    assert_eq!(b.call("GET", "/github/repos/acme/widget/issues", &token).await.0, 200, "recovers by itself");
}
