//! Config parsing, validation and lint: every error located, every problem reported at once.

use std::path::Path;

use chrono::{TimeZone, Utc};

use super::lint::{check, Severity};
use super::*;

const GOOD: &str = r#"
[server]
listen = "127.0.0.1:8443"

[audit]
path = "audit.jsonl"

[[connectors]]
name = "github"
owner = "platform@acme.example"
purpose = "triage"
expires = "2027-06-30"
upstream = "https://api.github.com/v3/"
credential = "literal:tok"
rate_limit = { per_second = 5 }

  [[connectors.operations]]
  name = "issues.read"
  method = "GET"
  path = "/repos/acme/{repo}/issues"

[[clients]]
id = "bot"
owner = "platform@acme.example"
secret_sha256 = "f404c02b90e06a93d8aaee9f2c844d61b3b9f621deb1c17f1334e9e14a391585"
grants = [ { connector = "github", operations = ["issues.read"], max_ttl = "60s" } ]
"#;

fn parse(text: &str) -> Result<Config, ConfigErrors> {
    Config::parse(text, Path::new("/etc/credbroker/credbroker.toml"))
}

#[test]
fn a_good_config_becomes_validated_types() {
    let c = parse(GOOD).unwrap();
    let gh = c.connector("github").unwrap();
    assert_eq!(gh.upstream.base_path, "/v3");
    assert_eq!(gh.upstream.authority.as_str(), "api.github.com");
    assert_eq!(
        gh.rate_limit,
        Some(RateLimit {
            per_second: 5,
            burst: 5
        })
    );
    assert_eq!(
        gh.expires_at,
        Utc.with_ymd_and_hms(2027, 7, 1, 0, 0, 0).unwrap(),
        "usable through the named day"
    );
    assert_eq!(
        c.audit.path,
        Path::new("/etc/credbroker/audit.jsonl"),
        "relative to the config file"
    );
    assert_eq!(c.state.dir, Path::new("/etc/credbroker/state"));
    assert_eq!(c.tokens.default_ttl, std::time::Duration::from_secs(300));
    assert!(c
        .client("bot")
        .unwrap()
        .is_granted("github", "issues.read", Utc::now()));
    assert_eq!(c.sha256.len(), 64);
}

#[test]
fn an_unknown_key_names_file_line_and_key() {
    let text = GOOD.replace(
        "listen = \"127.0.0.1:8443\"",
        "listen = \"127.0.0.1:8443\"\nlisen = \"x\"",
    );
    let err = parse(&text).unwrap_err().to_string();
    assert!(err.contains("/etc/credbroker/credbroker.toml:4"), "{err}");
    assert!(err.contains("lisen"), "{err}");
}

#[test]
fn every_semantic_problem_is_reported_at_once() {
    let text = GOOD
        .replace(
            "owner = \"platform@acme.example\"\npurpose",
            "owner = \"\"\npurpose",
        )
        .replace("https://api.github.com/v3/", "http://api.github.com")
        .replace("/repos/acme/{repo}/issues", "/repos/../{repo}")
        .replace("literal:tok", "env:CREDBROKER_TEST_UNSET_VAR")
        .replace(
            "operations = [\"issues.read\"], max_ttl = \"60s\"",
            "operations = [\"issues.write\"], max_ttl = \"2h\"",
        );
    let errors = parse(&text).unwrap_err().0;
    let all = errors
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    for needle in [
        "connectors[github].owner",
        "loopback",
        "invalid pattern",
        "CREDBROKER_TEST_UNSET_VAR",
        "has no operation `issues.write`",
        "above tokens.max_ttl",
    ] {
        assert!(all.contains(needle), "missing `{needle}` in:\n{all}");
    }
    assert!(errors.iter().all(|e| e.line.is_some()), "{all}");
}

#[test]
fn an_error_quotes_the_key_but_never_a_value() {
    // A raw secret pasted under a mistyped key, under the right key with the wrong type, and
    // as a wrong-typed number: each error names the line and key, never the value.
    let cases = [
        GOOD.replace(
            "credential = \"literal:tok\"",
            "credentials = \"ghp_RAW_SECRET_1\"",
        ),
        GOOD.replace(
            "credential = \"literal:tok\"",
            "credential = [\"ghp_RAW_SECRET_1\"]",
        ),
        GOOD.replace(
            "path = \"audit.jsonl\"",
            "path = \"audit.jsonl\"\nhmac_key = 424242424242",
        ),
        GOOD.replace("[audit]", "[audit]\nhmac_key = \"ghp_RAW_SECRET_1\""),
    ];
    for text in cases {
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("credbroker.toml:"), "{err}");
        assert!(
            !err.contains("RAW_SECRET") && !err.contains("424242"),
            "a value leaked: {err}"
        );
    }
    let err = parse(&GOOD.replace("credential = \"literal:tok\"", "credentials = \"x\""))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("credentials") && err.contains("unknown field"),
        "{err}"
    );
}

#[test]
fn line_key_quotes_keys_and_table_headers_only() {
    use super::validate::line_key;
    assert_eq!(line_key("credential = \"ghp_x\""), "credential");
    assert_eq!(line_key("\"quoted key\" = 1"), "\"quoted key\"");
    assert_eq!(line_key("[admin]  # old token: abc"), "[admin]");
    assert_eq!(line_key("[[connectors]] # x"), "[[connectors]]");
    assert_eq!(
        line_key("\"c2VjcmV0=\","),
        "",
        "a value inside a multi-line array"
    );
    assert_eq!(line_key("c2VjcmV0="), "");
    assert_eq!(line_key("ghp_secret_without_equals"), "");
}

#[test]
fn without_values_hides_what_serde_quotes_and_keeps_names() {
    use super::validate::without_values;
    assert_eq!(
        without_values(r#"invalid type: string "a\"b", expected u64"#),
        r#"invalid type: string "…", expected u64"#
    );
    assert_eq!(
        without_values("invalid type: integer `42`, expected a string"),
        "invalid type: integer …, expected a string"
    );
    assert_eq!(
        without_values("unknown field `hmac_kye`, expected one of `path`, `fsync`"),
        "unknown field `hmac_kye`, expected one of `path`, `fsync`"
    );
    assert_eq!(without_values("expected `\"`"), "expected `\"`");
}

#[test]
fn typos_inside_auth_and_credential_tables_are_named() {
    let bearer = GOOD.replace(
        "rate_limit = { per_second = 5 }",
        "rate_limit = { per_second = 5 }\nauth = { type = \"bearer\", prefix = \"token \" }",
    );
    let err = parse(&bearer).unwrap_err().to_string();
    assert!(err.contains("unknown field `prefix`"), "{err}");
    let dynamic = GOOD.replace(
        "credential = \"literal:tok\"",
        "credential = { type = \"oauth2_client_credentials\", token_url = \"https://l.example/t\", client_id = \"c\", client_secret = \"literal:s\", scopee = \"r\" }",
    );
    let err = parse(&dynamic).unwrap_err().to_string();
    assert!(err.contains("unknown field `scopee`"), "{err}");
    let kind = dynamic.replace("oauth2_client_credentials", "aws_sts");
    let err = parse(&kind).unwrap_err().to_string();
    assert!(
        err.contains("unknown variant …, expected `oauth2_client_credentials` or `github_app`"),
        "{err}"
    );
}

#[test]
fn reserved_names_shared_listeners_and_empty_hmac_keys_are_errors() {
    let err = parse(&GOOD.replace("name = \"github\"", "name = \"oauth2\""))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("connectors[oauth2].name") && err.contains("reserved"),
        "{err}"
    );
    let admin = "\n[admin]\nlisten = \"0.0.0.0:8443\"\ntoken_sha256 = \"f404c02b90e06a93d8aaee9f2c844d61b3b9f621deb1c17f1334e9e14a391585\"\n";
    let shared = GOOD.replace("[audit]", &format!("{admin}\n[audit]"));
    let err = parse(&shared).unwrap_err().to_string();
    assert!(err.contains("admin.listen"), "{err}");
    assert!(parse(&shared.replace("0.0.0.0:8443", "127.0.0.1:9443")).is_ok());
    // An admin token anyone could guess (the SHA-256 of "password", of nothing) is refused,
    // without naming the token.
    for weak in [
        "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8",
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    ] {
        let text = shared.replace("0.0.0.0:8443", "127.0.0.1:9443").replace(
            "f404c02b90e06a93d8aaee9f2c844d61b3b9f621deb1c17f1334e9e14a391585",
            weak,
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("admin.token_sha256") && err.contains("well-known"),
            "{err}"
        );
        assert!(!err.contains("password"), "{err}");
    }
    // A client secret anyone could guess ("test", as examples used) is warned about: its
    // tokens would make calls with the real credential injected.
    let test = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    let weak_client = GOOD.replace(
        &format!(
            "secret_sha256 = \"{}\"",
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
                b"unit-test-secret-not-on-any-list"
            ))
        ),
        &format!("secret_sha256 = \"{test}\""),
    );
    assert_ne!(weak_client, GOOD);
    assert!(parse(&weak_client).is_ok(), "a warning, not an error");
    let findings = check(&weak_client, Path::new("c.toml"), Utc::now());
    assert!(
        findings.iter().any(|f| f.severity == Severity::Warning
            && f.to_string().contains("clients[bot].secret_sha256")
            && f.to_string().contains("well-known")),
        "{findings:?}"
    );
    assert!(!check(GOOD, Path::new("c.toml"), Utc::now())
        .iter()
        .any(|f| f.to_string().contains("well-known")));
    let empty = GOOD.replace("[audit]", "[audit]\nhmac_key = \"literal:\"");
    let err = parse(&empty).unwrap_err().to_string();
    assert!(
        err.contains("audit.hmac_key") && err.contains("empty"),
        "{err}"
    );
}

#[test]
fn a_bad_rate_limit_names_its_line() {
    let text = GOOD.replace("{ per_second = 5 }", "{ per_second = 0 }");
    let err = parse(&text).unwrap_err().to_string();
    assert!(
        err.contains("credbroker.toml:15: connectors[github].rate_limit"),
        "{err}"
    );
}

#[test]
fn duplicates_and_unknown_connectors_are_errors() {
    let dup = format!("{GOOD}\n[[clients]]\nid = \"bot\"\nowner = \"x\"\nsecret_sha256 = \"{}\"\ngrants = [{{ connector = \"nope\", operations = [] }}]\n", "0".repeat(64));
    let all = parse(&dup).unwrap_err().to_string();
    assert!(all.contains("duplicate client id"), "{all}");
    // A second connector of the same name, without the granted operation: one error, not a
    // follow-on "has no operation" for the grant the first copy satisfies.
    let second = "\n[[connectors]]\nname = \"github\"\nowner = \"o\"\npurpose = \"p\"\nexpires = \"2027-01-01\"\nupstream = \"https://x.example\"\ncredential = \"literal:t\"\n";
    let all = parse(&format!("{GOOD}{second}")).unwrap_err().to_string();
    assert!(all.contains("duplicate connector name"), "{all}");
    assert!(!all.contains("has no operation"), "{all}");
}

#[test]
fn connect_and_trace_operations_are_refused() {
    for method in ["CONNECT", "TRACE"] {
        let text = GOOD.replace("method = \"GET\"", &format!("method = \"{method}\""));
        let err = parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("].method") && err.contains(&format!("{method} cannot be proxied")),
            "{method}: {err}"
        );
    }
    for method in ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"] {
        let text = GOOD.replace("method = \"GET\"", &format!("method = \"{method}\""));
        assert!(parse(&text).is_ok(), "{method}");
    }
}

#[test]
fn missing_required_fields_are_errors() {
    let text = GOOD.replace("purpose = \"triage\"\n", "");
    let err = parse(&text).unwrap_err().to_string();
    // The line of the table that lacks it, and the key in full.
    assert!(
        err.contains("credbroker.toml:8: connectors.purpose: missing field `purpose`"),
        "{err}"
    );
    // A table the file does not have has no line, and is not blamed on another table.
    let text = GOOD.replace("[audit]\npath = \"audit.jsonl\"\n", "");
    let err = parse(&text).unwrap_err().to_string();
    assert!(
        err.ends_with("credbroker.toml: audit: missing field `audit`"),
        "{err}"
    );
}

/// DESIGN §3.7 writes dynamic credentials as inline tables over several lines (TOML 1.1).
#[test]
fn inline_tables_may_span_lines() {
    let text = GOOD.replace(
        "credential = \"literal:tok\"",
        r#"credential = { type = "oauth2_client_credentials", token_url = "https://login.example/oauth2/token",
               client_id = "c", client_secret = "literal:s", scope = "read write", auth_method = "basic" }   # or "post""#,
    );
    let c = parse(&text).unwrap();
    assert!(matches!(
        c.connector("github").unwrap().credential,
        Credential::OAuth2(_)
    ));
}

#[test]
fn an_upstream_base_path_must_be_canonical() {
    for upstream in [
        "https://api.example/a/../b",
        "https://api.example//double",
        "https://api.example/a/./b",
        "https://api.example/v1#frag",
        "https://api.example/a%2fb",
    ] {
        let text = GOOD.replace("https://api.github.com/v3/", upstream);
        let err = parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("connectors[github].upstream"),
            "{upstream}: {err}"
        );
    }
    for upstream in [
        "https://api.example",
        "https://api.example/",
        "https://api.example/v1/",
    ] {
        let text = GOOD.replace("https://api.github.com/v3/", upstream);
        assert!(parse(&text).is_ok(), "{upstream}");
    }
}

#[test]
fn http_loopback_upstreams_are_allowed() {
    for up in [
        "http://127.0.0.1:9000",
        "http://localhost:1",
        "http://[::1]:80",
    ] {
        let text = GOOD.replace("https://api.github.com/v3/", up);
        assert!(parse(&text).is_ok(), "{up}");
    }
}

#[test]
fn lint_warns_about_governance_gaps() {
    let text = GOOD
        .replace("rate_limit = { per_second = 5 }\n", "")
        .replace("/repos/acme/{repo}/issues", "/repos/{*rest}")
        .replace("2027-06-30", "2026-12-10");
    let now = Utc.with_ymd_and_hms(2026, 11, 26, 0, 0, 0).unwrap();
    let findings = check(&text, Path::new("c.toml"), now);
    assert!(
        findings.iter().all(|f| f.severity == Severity::Warning),
        "{findings:?}"
    );
    let all = findings
        .iter()
        .map(|f| f.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    for needle in [
        "plain HTTP listener",
        "ephemeral",
        "literal:",
        "{*rest}",
        "within 30 days",
        "no rate_limit",
    ] {
        assert!(all.contains(needle), "missing `{needle}` in:\n{all}");
    }
    let later = Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap();
    let expired = check(&text, Path::new("c.toml"), later);
    assert!(expired
        .iter()
        .any(|f| f.to_string().contains("has expired")));
}

#[test]
fn lint_finds_ungranted_operations_and_grantless_clients() {
    let text = format!(
        "{GOOD}\n  [[connectors.operations]]\n  name = \"x\"\n  method = \"GET\"\n  path = \"/x\"\n"
    )
    .replace("[[clients]]", "[[clients]]\nid = \"idle\"\nowner = \"o\"\nsecret_sha256 = \"f404c02b90e06a93d8aaee9f2c844d61b3b9f621deb1c17f1334e9e14a391585\"\n\n[[clients]]");
    // The extra operation lands in the last table that was open: the connector's.
    let all = lint_lines(&text);
    assert!(all.contains("clients[idle]: has no grants"), "{all}");
}

#[test]
fn expired_elevations_grant_nothing_to_lint() {
    // The client's only grant is an elevation that has expired: the operation is granted to
    // no one, and the client has no grants in force.
    let text = GOOD.replace(
        "max_ttl = \"60s\" }",
        "max_ttl = \"60s\", expires = \"2020-01-01T00:00:00Z\", reason = \"INC-1\" }",
    );
    let all = lint_lines(&text);
    assert!(all.contains("clients[bot]: has no grants"), "{all}");
    assert!(
        all.contains("operations[issues.read]: granted to no client"),
        "{all}"
    );
    // A grant of no operation gives nothing either.
    let text = GOOD.replace("operations = [\"issues.read\"]", "operations = []");
    let all = lint_lines(&text);
    assert!(all.contains("clients[bot]: has no grants"), "{all}");
}

#[test]
fn a_value_with_a_newline_cannot_split_or_forge_a_finding() {
    // A client id and an operation name holding a newline, the second shaped like a finding.
    let text = GOOD
        .replace("id = \"bot\"", "id = \"b\\u202e\\\\n\\nerror: forged\"")
        .replace(
            "name = \"issues.read\"",
            "name = \"issues.read\\nwarning: x\"",
        );
    let findings = check(&text, Path::new("c.toml"), Utc::now());
    assert!(!findings.is_empty());
    for f in &findings {
        let line = f.to_string();
        assert!(!line.contains('\n'), "one finding a line: {line:?}");
        assert!(!line.contains('\u{202e}'), "no bidi override: {line:?}");
    }
    let all = lint_lines(&text);
    assert!(
        all.contains("client id must be non-empty and contain no ':' or control"),
        "{all}"
    );
    // The literal backslash-n doubled, the newline escaped, the override shown as its code.
    assert!(
        all.contains("b\\u{202e}\\\\n\\nerror: forged"),
        "shown escaped: {all}"
    );
}

/// `check`'s findings for `text` now, one a line.
fn lint_lines(text: &str) -> String {
    check(text, Path::new("c.toml"), Utc::now())
        .iter()
        .map(|f| f.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_shipped_example_parses_with_its_env_vars() {
    let text = include_str!("../../config/credbroker.toml");
    // Resolve the env: references without touching the process environment.
    let text = text
        .replace("env:GITHUB_ORG_TOKEN", "literal:x")
        .replace("env:SLACK_BOT_TOKEN", "literal:y")
        .replace("env:AUDIT_HMAC_KEY", "literal:z");
    let c = parse(&text).unwrap();
    assert_eq!(c.connectors.len(), 2);
    assert!(
        c.client("incident-bot").unwrap().grants[1]
            .reason
            .as_deref()
            == Some("INC-4711")
    );
}

#[test]
fn check_reports_unreadable_files_alongside_other_errors() {
    let text = GOOD
        .replace("{ per_second = 5 }", "{ per_second = 0 }")
        .replace(
            "[audit]",
            "[tokens]\nsigning_key = \"/nonexistent/key.pem\"\n\n[audit]",
        );
    let findings = check(
        &text,
        Path::new("/etc/credbroker/credbroker.toml"),
        Utc::now(),
    );
    let all: Vec<String> = findings.iter().map(|f| f.to_string()).collect();
    assert!(all.iter().any(|f| f.contains("rate_limit")), "{all:?}");
    assert!(
        all.iter().any(|f| f.contains("tokens.signing_key")),
        "{all:?}"
    );
    assert!(
        findings.iter().all(|f| f.severity == Severity::Error),
        "{all:?}"
    );
}

proptest::proptest! {
    /// Whatever secret is pasted where it does not belong, the error names the key, never it.
    #[test]
    fn no_error_quotes_a_pasted_value(value in "[A-Za-z0-9_+/=-]{12,40}") {
        for line in [
            format!("credentials = \"{value}\""),
            format!("credential = [\"{value}\"]"),
            format!("credential = {{ type = \"{value}\" }}"),
            format!("credential = {{ type = \"github_app\", app_id = \"{value}\" }}"),
        ] {
            let text = GOOD.replace("credential = \"literal:tok\"", &line);
            let err = parse(&text).unwrap_err().to_string();
            proptest::prop_assert!(!err.contains(&value), "{line}: {err}");
            proptest::prop_assert!(err.contains("credbroker.toml:"), "{err}");
        }
        // Nor does an error about a value from a fixed list (`fsync`, `[state] backend`).
        for text in [
            GOOD.replace("path = \"audit.jsonl\"", &format!("path = \"audit.jsonl\"\nfsync = \"{value}\"")),
            format!("{GOOD}\n[state]\nbackend = \"{value}\"\n"),
        ] {
            let err = parse(&text).unwrap_err().to_string();
            proptest::prop_assert!(!err.contains(&value), "{err}");
            proptest::prop_assert!(err.contains("must be one of"), "{err}");
        }
    }
}

#[test]
fn two_clients_with_one_certificate_identity_are_an_error() {
    let text = GOOD.replace(
        "secret_sha256 = \"f404c02b90e06a93d8aaee9f2c844d61b3b9f621deb1c17f1334e9e14a391585\"",
        "cert_san = \"spiffe://acme/bot\"",
    ) + r#"
[[clients]]
id = "other"
owner = "platform@acme.example"
cert_san = "spiffe://acme/bot"
"#;
    let err = parse(&text).unwrap_err().to_string();
    assert!(err.contains("clients[other].cert_san"), "{err}");
    assert!(err.contains("same cert_san"), "{err}");
    // DNS names are one identity whatever their case; URIs only byte for byte.
    let dns = text
        .replace("spiffe://acme/bot", "bot.acme.example")
        .replacen(
            "cert_san = \"bot.acme.example\"",
            "cert_san = \"Bot.Acme.Example\"",
            1,
        );
    assert!(dns.contains("Bot.Acme.Example") && dns.contains("\"bot.acme.example\""));
    let err = parse(&dns).unwrap_err().to_string();
    assert!(err.contains("same cert_san"), "{err}");
    let uris = text.replacen("spiffe://acme/bot", "spiffe://acme/Bot", 1);
    assert!(parse(&uris).is_ok());
}

#[test]
fn a_static_credential_that_cannot_be_sent_is_an_error() {
    // A CRLF secret file, or an env value with a newline: `serve` could not inject it.
    for bad in ["tok\\r", "tok\\nmore", "a\\u0000b"] {
        let text = GOOD.replace("literal:tok", &format!("literal:{bad}"));
        let err = parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("connectors[github].credential"),
            "{bad}: {err}"
        );
        assert!(err.contains("cannot be sent"), "{bad}: {err}");
    }
    // The same bytes are fine in a query parameter, which is percent-encoded.
    let query = GOOD.replace("literal:tok", "literal:tok\\r").replace(
        "rate_limit = { per_second = 5 }",
        "rate_limit = { per_second = 5 }\nauth = { type = \"query\", name = \"key\" }",
    );
    parse(&query).unwrap();
}

/// DESIGN §3.8: a request carrying the injected parameter is refused, so an operation that
/// lists it in `query` allows nothing by it.
#[test]
fn a_query_allowlist_naming_the_injected_parameter_is_warned() {
    let text = GOOD
        .replace(
            "rate_limit = { per_second = 5 }",
            "rate_limit = { per_second = 5 }\nauth = { type = \"query\", name = \"key\" }",
        )
        .replace(
            "path = \"/repos/acme/{repo}/issues\"",
            "path = \"/repos/acme/{repo}/issues\"\n  query = [\"page\", \"key\", \"%6Bey\"]",
        );
    let all = lint_lines(&text);
    for i in [1, 2] {
        let finding =
            format!("operations[issues.read].query[{i}]: is the parameter the broker injects");
        assert!(
            all.lines()
                .any(|l| l.starts_with("warning: ") && l.contains(&finding)),
            "{all}"
        );
    }
    assert!(!all.contains("query[0]"), "{all}");
}

#[test]
fn a_header_credential_may_be_a_cookie_but_not_a_header_the_broker_sets_or_frames_with() {
    let with_header = |name: &str| {
        GOOD.replace(
            "rate_limit = { per_second = 5 }",
            &format!(
                "rate_limit = {{ per_second = 5 }}\nauth = {{ type = \"header\", name = \"{name}\", prefix = \"session=\" }}"
            ),
        )
    };
    let c = parse(&with_header("Cookie")).unwrap();
    assert!(matches!(
        &c.connector("github").unwrap().auth,
        AuthMethod::Header { name, .. } if name == "cookie"
    ));
    for reserved in [
        "Host",
        "Connection",
        "Content-Length",
        "X-Request-Id",
        "X-Forwarded-For",
        "Via",
    ] {
        let err = parse(&with_header(reserved)).unwrap_err().to_string();
        assert!(err.contains("cannot inject into"), "{reserved}: {err}");
    }
}

#[test]
fn check_loads_tls_material_as_serve_does() {
    let dir = tempfile::tempdir().unwrap();
    let pki = crate::tls::generate_dev_pki(&["spiffe://acme.example/bot"]).unwrap();
    let client = pki.client("spiffe://acme.example/bot").unwrap();
    let write = |name: &str, bytes: &[u8]| std::fs::write(dir.path().join(name), bytes).unwrap();
    write("server.pem", pki.server().cert_pem.as_bytes());
    write("server-key.pem", pki.server().key_pem.expose());
    write("other-key.pem", client.key_pem.expose());
    write("empty.pem", b"not a certificate\n");
    write("ca.pem", pki.ca_cert_pem.as_bytes());
    let with_tls = |cert: &str, key: &str, ca: &str| {
        GOOD.replace(
            "listen = \"127.0.0.1:8443\"",
            &format!(
                "listen = \"127.0.0.1:8443\"\ntls_cert = \"{cert}\"\ntls_key = \"{key}\"\nclient_ca = \"{ca}\""
            ),
        )
        .replace(
            "credential = \"literal:tok\"",
            &format!("credential = \"literal:tok\"\nupstream_ca = \"{ca}\""),
        )
    };
    let errors = |text: &str| {
        check(text, &dir.path().join("c.toml"), Utc::now())
            .into_iter()
            .filter(|f| f.severity == Severity::Error)
            .map(|f| f.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        errors(&with_tls("server.pem", "server-key.pem", "ca.pem")),
        Vec::<String>::new()
    );
    let mismatch = errors(&with_tls("server.pem", "other-key.pem", "ca.pem"));
    assert!(
        mismatch.len() == 1 && mismatch[0].contains("server.tls_cert"),
        "{mismatch:?}"
    );
    let no_cert = errors(&with_tls("empty.pem", "server-key.pem", "ca.pem"));
    assert!(
        no_cert.len() == 1 && no_cert[0].contains("no valid PEM certificate"),
        "{no_cert:?}"
    );
    let bad_ca = errors(&with_tls("server.pem", "server-key.pem", "empty.pem"));
    // The CA file's fault is said of `client_ca` (its own line), not of the certificate.
    assert!(
        bad_ca.iter().any(|e| e.contains("server.client_ca"))
            && !bad_ca.iter().any(|e| e.contains("server.tls_cert"))
            && bad_ca
                .iter()
                .any(|e| e.contains("connectors[github].upstream_ca")),
        "{bad_ca:?}"
    );
    for e in mismatch.iter().chain(&no_cert).chain(&bad_ca) {
        assert!(
            !e.contains("PRIVATE KEY"),
            "no key material in a message: {e}"
        );
    }
}

#[test]
fn a_certificate_only_client_without_mtls_is_warned_about() {
    let cert_only = GOOD.replace(
        "secret_sha256 = \"f404c02b90e06a93d8aaee9f2c844d61b3b9f621deb1c17f1334e9e14a391585\"",
        "cert_san = \"spiffe://acme.example/bot\"",
    );
    let findings = check(&cert_only, Path::new("c.toml"), Utc::now());
    assert!(
        findings.iter().any(|f| f.severity == Severity::Warning
            && f.to_string().contains("clients[bot]")
            && f.to_string().contains("can never get a token")),
        "{findings:?}"
    );
    let findings = check(GOOD, Path::new("c.toml"), Utc::now());
    assert!(!findings
        .iter()
        .any(|f| f.to_string().contains("can never get a token")));
}

#[test]
fn the_admin_listener_has_its_own_connection_limit() {
    let admin = |extra: &str| {
        format!(
            "{GOOD}\n[admin]\nlisten = \"127.0.0.1:9443\"\ntoken_sha256 = \"f404c02b90e06a93d8aaee9f2c844d61b3b9f621deb1c17f1334e9e14a391585\"\n{extra}"
        )
    };
    let c = parse(&admin("")).unwrap();
    assert_eq!(c.admin.unwrap().max_connections, 256);
    let c = parse(&admin("max_connections = 1000\n")).unwrap();
    assert_eq!(c.admin.unwrap().max_connections, 1000);
    for bad in ["0", "9000000000000"] {
        let err = parse(&admin(&format!("max_connections = {bad}\n")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("admin.max_connections"), "{bad}: {err}");
    }
    let huge = GOOD.replace(
        "listen = \"127.0.0.1:8443\"",
        "listen = \"127.0.0.1:8443\"\nmax_connections = 4000000000",
    );
    let err = parse(&huge).unwrap_err().to_string();
    assert!(
        err.contains("server.max_connections") && err.contains("at most"),
        "{err}"
    );
}

#[test]
fn operators_have_names_and_tokens_of_their_own() {
    let shared = "f404c02b90e06a93d8aaee9f2c844d61b3b9f621deb1c17f1334e9e14a391585";
    let alice = "2bd806c97f0e00af1a1fc3328fa763a9269723c8db8fac4f93af71db186d6e90";
    let bob = "81b637d8fcd2c6da6359e6963113a1170de795e4b725b84d1e0b4cfd9ec58ce9";
    let admin = |operators: &str| {
        format!(
            "{GOOD}\n[admin]\nlisten = \"127.0.0.1:9443\"\ntoken_sha256 = \"{shared}\"\n{operators}"
        )
    };
    let op = |name: &str, hash: &str| {
        format!("[[admin.operators]]\nname = \"{name}\"\ntoken_sha256 = \"{hash}\"\n")
    };
    let c = parse(&admin(&format!(
        "{}{}",
        op("alice", alice),
        op("bob.ops-2", bob)
    )))
    .unwrap();
    let a = c.admin.unwrap();
    let digest = |hex_text: &str| {
        let mut d = [0u8; 32];
        hex::decode_to_slice(hex_text, &mut d).unwrap();
        d
    };
    assert_eq!(a.holder(&digest(shared)), Some(None));
    assert_eq!(a.holder(&digest(alice)), Some(Some("alice")));
    assert_eq!(a.holder(&digest(bob)), Some(Some("bob.ops-2")));
    assert_eq!(a.holder(&[7u8; 32]), None);
    assert!(parse(&admin(""))
        .unwrap()
        .admin
        .unwrap()
        .operators
        .is_empty());
    // Names an actor can carry unambiguously; one token, one actor.
    for (operators, key, says) in [
        (
            op("admin", alice),
            "admin.operators[0].name",
            "neither \"admin\"",
        ),
        (
            op("Anonymous", alice),
            "admin.operators[0].name",
            "nor \"anonymous\"",
        ),
        (
            op("alice@acme", alice),
            "admin.operators[0].name",
            "letters",
        ),
        (op("", alice), "admin.operators[0].name", "letters"),
        (
            op("Admin", alice),
            "admin.operators[0].name",
            "neither \"admin\"",
        ),
        (
            format!("{}{}", op("alice", alice), op("Alice", bob)),
            "admin.operators[1].name",
            "duplicate",
        ),
        (
            format!("{}{}", op("alice", alice), op("alice", bob)),
            "admin.operators[1].name",
            "duplicate",
        ),
        (
            op("alice", shared),
            "admin.operators[0].token_sha256",
            "of their own",
        ),
        (
            format!("{}{}", op("alice", alice), op("bob", alice)),
            "admin.operators[1].token_sha256",
            "of their own",
        ),
        (
            op(
                "alice",
                "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            ),
            "admin.operators[0].token_sha256",
            "well-known",
        ),
        (
            op("alice", "abc"),
            "admin.operators[0].token_sha256",
            "64 hex",
        ),
    ] {
        let err = parse(&admin(&operators)).unwrap_err().to_string();
        assert!(
            err.contains(key) && err.contains(says),
            "{operators}: {err}"
        );
    }
    let typo = parse(&admin(&op("alice", alice).replace("name =", "nmae ="))).unwrap_err();
    assert!(typo.to_string().contains("nmae"), "{typo}");
}

#[test]
fn operation_names_hold_no_whitespace_at_all() {
    // A tab would be one scope item at issuance and two when the token is read back.
    for bad in ["issues\\tread", "issues\\nread", "issues read"] {
        let text = GOOD.replace("name = \"issues.read\"", &format!("name = \"{bad}\""));
        let errors = parse(&text).unwrap_err().to_string();
        assert!(errors.contains("without whitespace"), "{bad:?}: {errors}");
    }
}

#[test]
fn a_grant_max_ttl_under_a_second_is_an_error() {
    for short in ["0s", "500ms"] {
        let text = GOOD.replace("max_ttl = \"60s\"", &format!("max_ttl = \"{short}\""));
        let errors = parse(&text).unwrap_err().to_string();
        assert!(errors.contains("must be at least 1s"), "{short}: {errors}");
    }
}

#[test]
fn token_lifetimes_under_a_second_are_errors() {
    for (key, value) in [("default_ttl", "500ms"), ("max_ttl", "999ms")] {
        let text = format!("[tokens]\n{key} = \"{value}\"\n{GOOD}");
        let errors = parse(&text).unwrap_err().to_string();
        assert!(errors.contains(&format!("tokens.{key}")), "{errors}");
        assert!(errors.contains("must be at least 1s"), "{errors}");
    }
    // Nor over ten years: centuries would put `exp` past what a time can say (year 9999).
    let text = format!("[tokens]\nmax_ttl = \"600000y\"\n{GOOD}");
    let errors = parse(&text).unwrap_err().to_string();
    assert!(
        errors.contains("tokens.max_ttl") && errors.contains("3653 days"),
        "{errors}"
    );
    let text = format!("[tokens]\nmax_ttl = \"3653d\"\n{GOOD}");
    assert!(parse(&text).is_ok());
}

#[test]
fn a_zero_leeway_allows_no_clock_skew() {
    for zero in ["0s", "0ms"] {
        let text = format!("[tokens]\nleeway = \"{zero}\"\n{GOOD}");
        let c = parse(&text).unwrap_or_else(|e| panic!("{zero}: {e}"));
        assert_eq!(c.tokens.leeway, std::time::Duration::ZERO);
    }
    let text = format!("[tokens]\nleeway = \"soon\"\n{GOOD}");
    assert!(parse(&text)
        .unwrap_err()
        .to_string()
        .contains("tokens.leeway"));
}

#[test]
fn a_query_name_no_request_can_carry_is_an_error_that_does_not_echo_it() {
    let with_query = |q: &str| {
        GOOD.replace(
            "path = \"/repos/acme/{repo}/issues\"",
            &format!("path = \"/repos/acme/{{repo}}/issues\"\n  query = [\"state\", {q}]"),
        )
    };
    for bad in [
        r#""""#,
        r#""state=open""#,
        r#""a&b""#,
        r#""a;b""#,
        r#""a b""#,
        r#""a#b""#,
        r#""café""#,
        r#""access_token""#,
        r#""bad%zz""#,
    ] {
        let errors = parse(&with_query(bad)).unwrap_err().0;
        assert_eq!(errors.len(), 1, "{bad}: {errors:?}");
        let e = errors[0].to_string();
        assert!(
            e.contains("connectors[github].operations[issues.read].query[1]"),
            "{bad}: {e}"
        );
        assert!(e.contains("never match"), "{bad}: {e}");
        assert!(errors[0].line.is_some(), "{bad}: {e}");
        assert!(!e.contains("open") && !e.contains("café"), "{bad}: {e}");
    }
    for good in [
        r#""per_page""#,
        r#""filter[state]""#,
        r#""a%5Fb""#,
        r#""a+b""#,
    ] {
        let c = parse(&with_query(good)).unwrap_or_else(|e| panic!("{good}: {e}"));
        let op = &c.connector("github").unwrap().operations[0];
        assert_eq!(op.query.as_ref().unwrap().len(), 2, "{good}");
    }
}

#[test]
fn lint_warns_of_query_names_url_encoders_escape() {
    let with_query = |q: &str| {
        GOOD.replace(
            "path = \"/repos/acme/{repo}/issues\"",
            &format!("path = \"/repos/acme/{{repo}}/issues\"\n  query = [\"state\", {q}]"),
        )
    };
    for escaped in [r#""$top""#, r#""filter[state]""#, r#""a+b""#] {
        let all = lint_lines(&with_query(escaped));
        assert!(
            all.contains("operations[issues.read].query[1]: names are compared as sent"),
            "{escaped}: {all}"
        );
    }
    for plain in [r#""per_page""#, r#""a%5Bb%5D""#] {
        assert!(
            !lint_lines(&with_query(plain)).contains("compared as sent"),
            "{plain}"
        );
    }
}

#[test]
fn lint_warns_that_a_star_in_a_pattern_is_literal() {
    for glob in ["/repos/acme/*/issues", "/repos/acme/widget/issues*"] {
        let text = GOOD.replace("/repos/acme/{repo}/issues", glob);
        let all = lint_lines(&text);
        assert!(
            all.contains("operations[issues.read].path: '*' is matched literally"),
            "{glob}: {all}"
        );
    }
    assert!(!lint_lines(GOOD).contains("literally"));
    let catch_all = GOOD.replace("/repos/acme/{repo}/issues", "/repos/{*rest}");
    assert!(!lint_lines(&catch_all).contains("literally"));
}

/// `check` finds what would stop `serve` at start-up beyond the config's own content: an
/// audit log that cannot be continued (a file where its folder should be, a last record that
/// does not verify under a newly set `hmac_key`) and a state folder that is not one.
#[test]
fn check_reports_an_audit_log_or_state_folder_serve_could_not_open() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(dir.path().join("a-file"), b"x").unwrap();
    let findings = |text: &str| -> Vec<String> {
        check(text, &config, Utc::now())
            .into_iter()
            .filter(|f| f.severity == Severity::Error)
            .map(|f| f.to_string())
            .collect()
    };
    assert_eq!(findings(GOOD), Vec::<String>::new());

    let under_a_file = GOOD.replace("path = \"audit.jsonl\"", "path = \"a-file/audit.jsonl\"");
    let errors = findings(&under_a_file);
    assert!(
        errors.len() == 1 && errors[0].contains("audit.path") && errors[0].contains("not a folder"),
        "{errors:?}"
    );

    let state_is_a_file = format!("{GOOD}\n[state]\ndir = \"a-file\"\n");
    let errors = findings(&state_is_a_file);
    assert!(
        errors.len() == 1 && errors[0].contains("state.dir") && errors[0].contains("not a folder"),
        "{errors:?}"
    );

    // A log written with the plain chain, then `hmac_key` set: serve refuses, so check does.
    let log = crate::audit::AuditLog::open(crate::audit::AuditOptions {
        path: dir.path().join("audit.jsonl"),
        fsync: crate::audit::FsyncPolicy::Never,
        rotate_bytes: None,
        hmac_key: None,
        replica: None,
    })
    .unwrap();
    log.append_blocking(crate::audit::Record::new(crate::audit::Event::Startup))
        .unwrap();
    log.close();
    assert_eq!(findings(GOOD), Vec::<String>::new());
    let keyed = GOOD.replace(
        "path = \"audit.jsonl\"",
        "path = \"audit.jsonl\"\nhmac_key = \"literal:new-key\"",
    );
    let errors = findings(&keyed);
    assert!(
        errors.len() == 1 && errors[0].contains("audit.path") && errors[0].contains("hmac_key"),
        "{errors:?}"
    );
    // The file was only read: it still ends with the one record, unlocked for serve.
    let lines = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 1);
}
