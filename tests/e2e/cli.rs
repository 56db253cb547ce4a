//! DESIGN §2: the commands' outputs and exit codes, run as the real binary.

use std::process::{Command, Output};

use crate::support::*;

fn credbroker(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_credbroker"))
        .args(args)
        .output()
        .unwrap()
}

/// Runs in `dir`, away from the repository's `config/credbroker.toml` (the default config,
/// which the auditor's commands would read).
fn credbroker_in(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_credbroker"))
        .args(args)
        .current_dir(dir)
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
    // A method token no operation names is a question with an answer: deny, as the proxy
    // answers 403 (methods are case-sensitive); what is no method at all is bad input.
    for method in ["get", "M-SEARCH", "VERSION-CONTROL"] {
        let o = run("bot", method, "/github/repos/acme/widget/issues");
        assert_eq!(code(&o), 1, "{method}");
    }
    for method in ["", "GE T", "GET\r\n", "(GET)"] {
        assert_eq!(code(&run("bot", method, "/github/x")), 2, "{method:?}");
    }
    assert_eq!(code(&run("bot", "GET", "/github/../x")), 2);
    // Targets the HTTP layer itself refuses (400 before any check): bad input too, not allow.
    for target in [
        "/github/repos/acme/x<y/issues",
        "/github/repos/acme/x`y/issues",
        "/github/repos/acme/widget/issues?state=\"open\"",
        "/github/repos/acme/widget/issues?state=>",
    ] {
        assert_eq!(code(&run("bot", "GET", target)), 2, "{target}");
    }
    let o = run("bot", "GET", "github/repos/acme/widget/issues");
    assert_eq!(code(&o), 2);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("the path fails the canonical check"),
        "{o:?}"
    );
    // Check 1's other refusals: a request line over max_header_bytes (8192 here: 431) ...
    let long = format!("/github/repos/acme/{}/issues", "w".repeat(9000));
    assert_eq!(code(&run("bot", "GET", &long)), 2);
    // ... and a client copy of a `query` credential's parameter (400), in any encoding.
    let query_auth = std::fs::read_to_string(&path).unwrap().replacen(
        "upstream_timeout = \"2s\"\n",
        "upstream_timeout = \"2s\"\nauth = { type = \"query\", name = \"api_key\" }\n",
        1,
    );
    std::fs::write(&path, query_auth).unwrap();
    assert_eq!(
        code(&run("bot", "GET", "/github/repos/acme/widget/issues")),
        0
    );
    for target in [
        "/github/repos/acme/widget/issues?api_key=mine",
        "/github/repos/acme/widget/issues?state=open&api%5Fkey=mine",
    ] {
        let o = run("bot", "GET", target);
        assert_eq!(code(&o), 2, "{target}: {o:?}");
    }
    // A state file that cannot be read leaves the kill switch unknown: bad input, not allow.
    let issues = "/github/repos/acme/widget/issues";
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("revocations.json"), "not json").unwrap();
    assert_eq!(code(&run("bot", "GET", issues)), 2);
    std::fs::remove_file(state.join("revocations.json")).unwrap();
    assert_eq!(code(&run("bot", "GET", issues)), 0);
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
    let again = credbroker(&["keygen", "signing-key", "--out", key.to_str().unwrap()]);
    assert_ne!(code(&again), 0, "never overwrites");
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already exists"),
        "{again:?}"
    );
    let nowhere = dir.path().join("missing/signing.pem");
    let o = credbroker(&["keygen", "signing-key", "--out", nowhere.to_str().unwrap()]);
    assert_ne!(code(&o), 0);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("folder does not exist"),
        "the message names the real problem: {o:?}"
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
    // Script-friendly: the secret alone on the first line, the config line on the second.
    assert_eq!(out.lines().count(), 2, "{out}");
    let secret = out.lines().next().unwrap();
    assert!(secret.len() >= 32 && !secret.contains(' '), "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("secret_sha256 = "))
        .unwrap();
    assert!(line.contains(&sha256_hex(secret)), "{out}");
}

/// Records before the file's start deleted (retention removed `audit.jsonl.1`): refused by
/// default, verified from the first record given with `--pruned`, which still sees tampering.
fn verify_after_pruning(
    credbroker: &dyn Fn(&[&str]) -> std::process::Output,
    log: &std::path::Path,
    dir: &std::path::Path,
) {
    let text = std::fs::read_to_string(log).unwrap();
    let rest: String = text.split_inclusive('\n').skip(2).collect();
    let pruned = dir.join("pruned.jsonl");
    std::fs::write(&pruned, &rest).unwrap();
    let file = pruned.to_str().unwrap();
    let o = credbroker(&["audit", "verify", file]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(code(&o), 1, "{out}");
    assert!(
        out.contains("starts at seq 3") && out.contains("--pruned"),
        "{out}"
    );
    let o = credbroker(&["audit", "verify", "--pruned", file]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(code(&o), 0, "{out}");
    assert!(out.contains("from seq 3"), "{out}");
    std::fs::write(&pruned, rest.replacen("\"seq\":4", "\"seq\":40", 1)).unwrap();
    let o = credbroker(&["audit", "verify", "--pruned", file]);
    assert_eq!(code(&o), 1, "{}", String::from_utf8_lossy(&o.stdout));
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
    let elsewhere = tempfile::tempdir().unwrap();
    let credbroker = |args: &[&str]| credbroker_in(elsewhere.path(), args);
    let o = credbroker(&["audit", "verify", path.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stdout));
    verify_after_pruning(&credbroker, &path, elsewhere.path());
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

/// A chain of `n` `startup` records built as DESIGN §5 says, keyed with `key` if given.
fn chain(n: u64, key: Option<&[u8]>) -> String {
    use hmac::{Hmac, Mac};
    use sha2::{Digest, Sha256};
    let mut prev = "0".repeat(64);
    let mut out = String::new();
    for seq in 1..=n {
        let body = format!(
            r#"{{"seq":{seq},"ts":"2026-11-26T10:00:0{seq}.000000Z","event":"startup","version":"x","config_sha256":"{}","prev":"{prev}"}}"#,
            "0".repeat(64)
        );
        let hash = match key {
            Some(k) => {
                let mut mac = Hmac::<Sha256>::new_from_slice(k).unwrap();
                mac.update(body.as_bytes());
                hex::encode(mac.finalize().into_bytes())
            }
            None => hex::encode(Sha256::digest(body.as_bytes())),
        };
        out.push_str(&format!(
            "{},\"hash\":\"{hash}\"}}\n",
            &body[..body.len() - 1]
        ));
        prev = hash;
    }
    out
}

/// DESIGN §2, §5: a config that declares a keyed chain is never silently dropped for an
/// unkeyed check — a plain chain is what someone without the key can forge.
#[test]
fn audit_verify_never_falls_back_to_an_unkeyed_check() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("config")).unwrap();
    // The default config declares a keyed chain whose key is not available here.
    std::fs::write(
        dir.path().join("config/credbroker.toml"),
        "[server]\nlisten = \"127.0.0.1:9\"\n[audit]\npath = \"a.jsonl\"\nhmac_key = \"env:CREDBROKER_TEST_UNSET_KEY\"\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("forged.jsonl"), chain(3, None)).unwrap();
    let verify = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_credbroker"))
            .args(["audit", "verify"])
            .args(args)
            .current_dir(dir.path())
            .env_remove("CREDBROKER_TEST_UNSET_KEY")
            .output()
            .unwrap()
    };
    let o = verify(&["forged.jsonl"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_ne!(code(&o), 0, "{out}");
    assert!(!out.contains("intact"), "{out}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("CREDBROKER_TEST_UNSET_KEY"),
        "says why"
    );

    // With no default config at all, the check is unkeyed and says so on stderr.
    std::fs::remove_file(dir.path().join("config/credbroker.toml")).unwrap();
    let o = verify(&["forged.jsonl"]);
    assert_eq!(code(&o), 0);
    assert!(String::from_utf8_lossy(&o.stderr).contains("plain SHA-256"));
}

/// The auditor's commands read only the chain key and the grants: they work without the
/// connectors' upstream credentials.
#[test]
fn audit_verify_and_report_need_no_upstream_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("credbroker.toml");
    let text = standard_config("127.0.0.1:9".parse().unwrap());
    assert!(
        text.contains("credential = \""),
        "the fixture has a connector"
    );
    let text = text
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("credential = ") {
                "credential = \"env:CREDBROKER_TEST_UNSET_CREDENTIAL\"".to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        .replace("[audit]", "[audit]\nhmac_key = \"literal:auditor-key\"");
    std::fs::write(&config, text).unwrap();
    let log = dir.path().join("keyed.jsonl");
    std::fs::write(&log, chain(2, Some(b"auditor-key"))).unwrap();
    let (config, log) = (config.to_str().unwrap(), log.to_str().unwrap());
    let o = credbroker(&["audit", "verify", log, "--config", config]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("intact: 2 records"));
    let o = credbroker(&["audit", "report", log, "--config", config, "--json"]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(report["unused_grants"]
        .as_array()
        .is_some_and(|g| !g.is_empty()));
    // The full config does not load here, which is what `serve` and `check` need.
    let o = credbroker(&["check", "--config", config]);
    assert_eq!(code(&o), 1);
    // Nor does the report need the chain key: an auditor without it (kept off the host, as
    // DESIGN §5 advises) still gets the least-privilege report; verify says what is missing.
    let keyless = std::fs::read_to_string(config).unwrap().replace(
        "hmac_key = \"literal:auditor-key\"",
        "hmac_key = \"env:CREDBROKER_TEST_UNSET_KEY\"",
    );
    std::fs::write(config, keyless).unwrap();
    let o = credbroker(&["audit", "report", log, "--config", config, "--json"]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    let o = credbroker(&["audit", "verify", log, "--config", config]);
    assert_ne!(code(&o), 0);
    assert!(String::from_utf8_lossy(&o.stderr).contains("CREDBROKER_TEST_UNSET_KEY"));
}

/// `audit query` and `report` keep every file open while they merge them: a long retention
/// set passes the usual soft limit of open files, which they raise toward the hard one.
#[tokio::test]
async fn query_and_report_read_more_files_than_the_soft_open_file_limit() {
    let up = FakeUpstream::start().await;
    let mut b = TestBroker::start(&standard_config(up.addr)).await;
    b.stop().await;
    let per_file = b.audit().len();
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<String> = (0..100)
        .map(|i| {
            let path = dir.path().join(format!("replica-{i}.jsonl"));
            std::fs::copy(b.audit_path(), &path).unwrap();
            path.display().to_string()
        })
        .collect();
    for command in ["query", "report"] {
        let o = Command::new("sh")
            .arg("-c")
            .arg("ulimit -Sn 32 && exec \"$0\" audit \"$@\"")
            .arg(env!("CARGO_BIN_EXE_credbroker"))
            .arg(command)
            .arg("--json")
            .args(&files)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{command}: {stderr}");
        // The copies hold the same records: each is passed once, and the rest are counted.
        let skipped = format!("note: skipped {} duplicate records", 99 * per_file);
        assert!(stderr.contains(&skipped), "{command}: {stderr}");
        if command == "query" {
            let lines = String::from_utf8_lossy(&o.stdout).lines().count();
            assert_eq!(lines, per_file);
        }
    }
}

/// DESIGN §2: `audit verify --hmac-key REF` checks a keyed chain with a key given on its own
/// (an auditor holds it off the host); a relative `file:` REF is relative to the current
/// directory; `--config` and `--hmac-key` together are refused; the wrong key breaks line 1.
#[test]
fn verify_takes_the_chain_key_as_a_secret_reference() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("keyed.jsonl"), chain(3, Some(b"auditor-key"))).unwrap();
    // One trailing newline of a file: secret is dropped (DESIGN §3).
    std::fs::write(d.join("chain.key"), "auditor-key\n").unwrap();
    std::fs::write(d.join("wrong.key"), "other-key\n").unwrap();
    let verify = |extra: &[&str]| {
        let mut args = vec!["audit", "verify", "keyed.jsonl"];
        args.extend_from_slice(extra);
        credbroker_in(d, &args)
    };
    for key in ["file:chain.key", "literal:auditor-key"] {
        let o = verify(&["--hmac-key", key]);
        assert_eq!(code(&o), 0, "{key}: {}", String::from_utf8_lossy(&o.stderr));
        assert!(String::from_utf8_lossy(&o.stdout).starts_with("intact: 3 records"));
    }
    let o = Command::new(env!("CARGO_BIN_EXE_credbroker"))
        .args([
            "audit",
            "verify",
            "keyed.jsonl",
            "--hmac-key",
            "env:CB_TEST_CHAIN_KEY",
        ])
        .env("CB_TEST_CHAIN_KEY", "auditor-key")
        .current_dir(d)
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    let o = verify(&["--hmac-key", "file:wrong.key"]);
    assert_eq!(code(&o), 1);
    let out = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(out.contains("keyed.jsonl:1: hash mismatch"), "{out}");
    assert!(
        !out.contains("other-key") && !out.contains("auditor-key"),
        "{out}"
    );
    // Without a key, the keyed chain is no plain SHA-256 chain.
    assert_eq!(code(&verify(&[])), 1);
    let config = write_config(d);
    let o = verify(&[
        "--hmac-key",
        "file:chain.key",
        "--config",
        config.to_str().unwrap(),
    ]);
    assert_ne!(code(&o), 0);
    assert!(String::from_utf8_lossy(&o.stderr).contains("not both"));
}

/// `serve --dev` runs on its embedded config: given a `--config` too, it refuses (exit 2)
/// rather than ignore the file the operator believes in force.
#[test]
fn serve_dev_refuses_a_config_file_it_would_ignore() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let o = credbroker_in(
        dir.path(),
        &["serve", "--dev", "--config", config.to_str().unwrap()],
    );
    assert_eq!(code(&o), 2);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--dev"));
    assert!(
        !dir.path().join("credbroker-dev-audit.jsonl").exists(),
        "nothing started"
    );
}
