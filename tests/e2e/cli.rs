//! DESIGN §2: the commands' outputs and exit codes, run as the real binary.

use std::process::{Command, Output};

use crate::support::*;

fn credbroker(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_credbroker"))
        .args(args)
        .output()
        .unwrap()
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap()
}

fn write_config(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("credbroker.toml");
    std::fs::write(&path, standard_config("127.0.0.1:9".parse().unwrap())).unwrap();
    path
}

#[test]
fn check_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path());
    let o = credbroker(&["check", "--config", path.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(code(&o), 0, "{out}");
    assert!(out.lines().all(|l| l.starts_with("warning: ")), "{out}");
    assert!(out.contains("literal:"), "{out}");
    std::fs::write(
        &path,
        "[server]\nlisten = \"127.0.0.1:1\"\nbogus = 1\n[audit]\npath = \"a\"\n",
    )
    .unwrap();
    let o = credbroker(&["check", "--config", path.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(code(&o), 1, "{out}");
    assert!(
        out.contains("error: ") && out.contains(":3") && out.contains("bogus"),
        "{out}"
    );
}

#[test]
fn the_shipped_example_passes_check_once_its_env_vars_are_set() {
    let o = Command::new(env!("CARGO_BIN_EXE_credbroker"))
        .args([
            "check",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/credbroker.toml"),
        ])
        .env("GITHUB_ORG_TOKEN", "x")
        .env("SLACK_BOT_TOKEN", "y")
        .env("AUDIT_HMAC_KEY", "z")
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stdout));
    let o = credbroker(&[
        "check",
        "--config",
        concat!(env!("CARGO_MANIFEST_DIR"), "/config/credbroker.toml"),
    ]);
    assert_eq!(code(&o), 1, "unset env vars are errors");
}

#[test]
fn explain_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path());
    let p = path.to_str().unwrap();
    let run = |client: &str, method: &str, target: &str| {
        credbroker(&[
            "explain", "--config", p, "--client", client, "--method", method, "--path", target,
        ])
    };
    let o = run("bot", "GET", "/github/repos/acme/widget/issues");
    assert_eq!(code(&o), 0);
    assert!(String::from_utf8_lossy(&o.stdout).contains("issues.read"));
    let o = run("bot", "DELETE", "/github/repos/acme/widget");
    assert_eq!(code(&o), 1);
    assert!(String::from_utf8_lossy(&o.stdout).contains("not granted"));
    assert_eq!(
        code(&run("bot", "GET", "/nosuch/x")),
        1,
        "unknown connector is a deny"
    );
    assert_eq!(code(&run("nobody", "GET", "/github/x")), 2);
    assert_eq!(code(&run("bot", "get", "/github/x")), 2);
    assert_eq!(code(&run("bot", "GET", "/github/../x")), 2);
    assert_eq!(
        code(&credbroker(&[
            "explain",
            "--config",
            "/nonexistent.toml",
            "--client",
            "bot",
            "--method",
            "GET",
            "--path",
            "/a"
        ])),
        2
    );
}

#[test]
fn keygen_commands() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("signing.pem");
    let o = credbroker(&["keygen", "signing-key", "--out", key.to_str().unwrap()]);
    assert_eq!(code(&o), 0);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    credbroker::token::SigningKeys::from_pem_file(&key).unwrap();
    assert_ne!(
        code(&credbroker(&[
            "keygen",
            "signing-key",
            "--out",
            key.to_str().unwrap()
        ])),
        0,
        "never overwrites"
    );
    // Every command takes --config (DESIGN §2), even where it does not need one.
    assert_eq!(
        code(&credbroker(&[
            "keygen",
            "client-secret",
            "--config",
            "/nonexistent.toml"
        ])),
        0
    );
    let o = credbroker(&["keygen", "client-secret"]);
    let out = String::from_utf8_lossy(&o.stdout);
    let secret = out.lines().next().unwrap().rsplit(' ').next().unwrap();
    let line = out
        .lines()
        .find(|l| l.starts_with("secret_sha256 = "))
        .unwrap();
    assert!(line.contains(&sha256_hex(secret)), "{out}");
}

#[tokio::test]
async fn audit_verify_detects_tampering() {
    let up = FakeUpstream::start().await;
    let mut b = TestBroker::start(&standard_config(up.addr)).await;
    let token = b.token("github:issues.read", &[]).await;
    b.call("GET", "/github/repos/acme/widget/issues", &token)
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    b.stop().await;
    let path = b.audit_path();
    let o = credbroker(&["audit", "verify", path.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stdout));
    let text = std::fs::read_to_string(&path).unwrap().replacen(
        "\"decision\":\"allow\"",
        "\"decision\":\"deny\"",
        1,
    );
    std::fs::write(&path, text).unwrap();
    let o = credbroker(&["audit", "verify", path.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(code(&o), 1, "{out}");
    assert!(
        out.contains(":3:") || out.contains(":4:"),
        "names the bad line: {out}"
    );
    let o = credbroker(&[
        "audit",
        "query",
        path.to_str().unwrap(),
        "--event",
        "proxy",
        "--json",
    ]);
    assert_eq!(code(&o), 0);
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 1);
}
