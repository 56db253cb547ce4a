//! `serve --dev`: a zero-setup demo. A built-in demo upstream that answers only when it sees
//! the real credential, the embedded `config/dev.toml` filled with fresh random secrets, and
//! a welcome text with ready-to-paste curl commands.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;

use base64::Engine;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::cli::serve::Running;
use crate::config::{Config, ConfigErrors};
use crate::secret::Secret;

const DEV_CONFIG: &str = include_str!("../config/dev.toml");

/// The demo's generated secrets and the demo upstream's address.
pub struct Dev {
    upstream: SocketAddr,
    credential: Secret,
    client_secret: Secret,
    admin_token: Secret,
}

fn random_secret(prefix: &str) -> Secret {
    let mut bytes = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut bytes);
    Secret::new(format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    ))
}

/// Starts the demo upstream and draws the demo's secrets.
pub async fn prepare() -> anyhow::Result<Dev> {
    let credential = random_secret("ghs_demo_");
    let upstream = start_demo_upstream(credential.clone()).await?;
    Ok(Dev {
        upstream,
        credential,
        client_secret: random_secret(""),
        admin_token: random_secret("adm_"),
    })
}

/// Each demo run starts with no revocations or kill switches: its signing key, client secret
/// and credential are new, so an earlier run's state names nothing of this one — but a kill
/// switch left on `github` would make the printed commands fail, unexplained.
pub fn forget_previous_run(config: &Config) -> anyhow::Result<()> {
    let file = config.state.dir.join(crate::state::local::STATE_FILE);
    match std::fs::remove_file(&file) {
        Ok(()) => {
            crate::cli::serve::say(format_args!(
                "dev: forgot the revocations and kill switches of an earlier dev run"
            ));
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(anyhow::anyhow!("cannot clear {}: {e}", file.display())),
    }
}

impl Dev {
    /// The dev config with this run's values; relative paths resolve in the current folder.
    pub fn config(&self) -> Result<Config, ConfigErrors> {
        let expires = (chrono::Utc::now() + chrono::Duration::days(90))
            .format("%Y-%m-%d")
            .to_string();
        let text = DEV_CONFIG
            .replace("{{UPSTREAM}}", &self.upstream.to_string())
            .replace("{{EXPIRES}}", &expires)
            .replace(
                "{{CREDENTIAL}}",
                std::str::from_utf8(self.credential.expose()).unwrap_or_default(),
            )
            .replace(
                "{{CLIENT_SECRET_SHA256}}",
                &hex::encode(Sha256::digest(self.client_secret.expose())),
            )
            .replace(
                "{{ADMIN_TOKEN_SHA256}}",
                &hex::encode(Sha256::digest(self.admin_token.expose())),
            );
        let mut config = Config::parse(&text, &PathBuf::from("./credbroker-dev.toml"))?;
        config.in_memory = true;
        Ok(config)
    }

    /// What a newcomer needs to follow the walk-through. Dev secrets are printed on purpose:
    /// they are random per run and guard nothing but the demo upstream.
    pub fn print_welcome(&self, running: &Running) {
        let proxy = running.proxy_addr;
        let secret = String::from_utf8_lossy(self.client_secret.expose());
        // This very binary, so step 4 works wherever the demo runs (not only in a checkout).
        let exe = std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "credbroker".into());
        let admin_token = String::from_utf8_lossy(self.admin_token.expose());
        let admin = running
            .admin_addr
            .map(|a| a.to_string())
            .unwrap_or_default();
        // Lost if stdout is gone (`println!` would panic; the broker goes on serving).
        use std::io::Write;
        let _ = writeln!(
            std::io::stdout(),
            r#"credbroker dev mode — NOT for real credentials
  proxy + token endpoint: http://{proxy}
  admin API:              http://{admin}   (admin token: {admin_token})
  demo upstream:          http://{upstream} (answers only with the injected demo credential)
  audit log:              ./credbroker-dev-audit.jsonl

demo client: demo-bot   secret: {secret}

1. get a token (scoped to reading issues, 5 minutes):
   TOKEN=$(curl -s -u 'demo-bot:{secret}' -d grant_type=client_credentials \
     -d scope=github:issues.read http://{proxy}/oauth2/token | sed -E 's/.*"access_token":"([^"]+)".*/\1/')

2. an allowed call — the broker injects the real credential:
   curl -i -H "Authorization: Bearer $TOKEN" 'http://{proxy}/github/repos/acme/widget/issues?state=open'

3. a denied call — outside the token's scope, it never leaves the broker:
   curl -i -X DELETE -H "Authorization: Bearer $TOKEN" http://{proxy}/github/repos/acme/widget

4. the audit trail, and its verification:
   tail -n 3 credbroker-dev-audit.jsonl
   {exe} audit verify credbroker-dev-audit.jsonl

Ctrl-C stops the broker."#,
            upstream = self.upstream,
        );
    }
}

/// A tiny fake of the GitHub API on a loopback port.
async fn start_demo_upstream(credential: Secret) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let expected = [b"Bearer ".as_slice(), credential.expose()].concat();
    let expected = std::sync::Arc::new(Secret::new(expected));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let expected = std::sync::Arc::clone(&expected);
            tokio::spawn(async move {
                let svc = service_fn(move |req| demo_answer(std::sync::Arc::clone(&expected), req));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

async fn demo_answer(
    expected: std::sync::Arc<Secret>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let authorized = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == expected.expose());
    let (status, body) = if authorized {
        (
            StatusCode::OK,
            serde_json::json!({
                "demo": "credbroker demo upstream",
                "method": req.method().as_str(),
                "path": req.uri().path(),
                "query": req.uri().query(),
                "credential_seen": true,
                "issues": [{"number": 1, "title": "Widget squeaks", "state": "open"}],
            }),
        )
    } else {
        (
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"message": "Bad credentials"}),
        )
    };
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp.headers_mut().insert(
        "x-github-request-id",
        http::HeaderValue::from_str(&format!("DEMO-{:08X}", rand::random::<u32>()))
            .unwrap_or(http::HeaderValue::from_static("DEMO")),
    );
    Ok(resp)
}
