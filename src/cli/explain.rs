//! `credbroker explain`: would the current config let client C make this call, and why.

use std::process::ExitCode;

use clap::Args;
use http::Method;

use crate::config::Config;

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The client id.
    #[arg(long)]
    pub client: String,
    /// The HTTP method, e.g. GET.
    #[arg(long)]
    pub method: String,
    /// The full proxy path, e.g. /github/repos/acme/widget/issues (a query is allowed).
    #[arg(long)]
    pub path: String,
}

/// The verdict: allowed by which operation, or refused and why.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow {
        connector: String,
        operation: String,
    },
    Deny(String),
    BadInput(String),
}

pub fn run(args: &ExplainArgs, config_path: &std::path::Path) -> ExitCode {
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match explain(
        &config,
        &args.client,
        &args.method,
        &args.path,
        chrono::Utc::now(),
    ) {
        Verdict::Allow {
            connector,
            operation,
        } => {
            println!(
                "allow: {} {} matches operation {connector}:{operation}, granted to {}",
                args.method, args.path, args.client
            );
            ExitCode::SUCCESS
        }
        Verdict::Deny(why) => {
            println!("deny: {why}");
            ExitCode::from(1)
        }
        Verdict::BadInput(why) => {
            eprintln!("bad input: {why}");
            ExitCode::from(2)
        }
    }
}

/// The decision the proxy's checks 1 and 3 would make for a token holding every grant.
pub fn explain(
    config: &Config,
    client_id: &str,
    method: &str,
    full_path: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Verdict {
    let Some(client) = config.client(client_id) else {
        return Verdict::BadInput(format!("unknown client `{client_id}`"));
    };
    // Any method token the proxy would read (RFC 9110 §9.1: `M-SEARCH`, even `get`, which
    // no operation names) is a question with an answer — deny, as the proxy says 403; only
    // what is no method at all is bad input.
    let method = match Method::from_bytes(method.as_bytes()) {
        Ok(m) => m,
        Err(_) => {
            return Verdict::BadInput(format!(
                "`{}` is not an HTTP method (a token of letters, digits and !#$%&'*+-.^_`|~)",
                method.escape_debug()
            ))
        }
    };
    // Check 1's size bound: the request line alone must fit (the proxy answers 431).
    let request_line = method.as_str().len() + full_path.len() + " HTTP/1.1\r\n".len() + 1;
    if request_line > config.server.max_header_bytes {
        return Verdict::BadInput(format!(
            "the request line alone ({request_line} bytes) exceeds server.max_header_bytes ({})",
            config.server.max_header_bytes
        ));
    }
    // A fragment never reaches the proxy's checks (the HTTP layer drops it): drop it here too.
    let full_path = full_path
        .split_once('#')
        .map_or(full_path, |(before, _)| before);
    let (path, query) = match full_path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (full_path, None),
    };
    if let Err(e) = crate::proxy::canonical::check_path(path) {
        return Verdict::BadInput(format!("the path fails the canonical check: {e}"));
    }
    if let Some(q) = query {
        if let Err(e) = crate::proxy::canonical::check_query(q) {
            return Verdict::BadInput(format!("the query fails the canonical check: {e}"));
        }
    }
    // The HTTP layer refuses a target the `http` crate cannot parse (a raw `<`, `>` or `` ` ``
    // in the path; those and `"` in the query; over 64 KiB) with a bare 400 before any check
    // runs. Asked after check 1's own tests, whose messages are the clearer ones.
    if http::uri::PathAndQuery::try_from(full_path).is_err() {
        return Verdict::BadInput(
            "the HTTP layer refuses this request target (too long, or a byte in it that must be \
             percent-encoded)"
                .into(),
        );
    }
    let (name, upstream_path) = crate::proxy::canonical::split_target(path);
    let Some(connector) = config.connector(name) else {
        return Verdict::Deny(format!("no connector named `{name}`"));
    };
    // Check 1 too: a client copy of the parameter the broker injects (the proxy answers 400).
    if let (crate::config::AuthMethod::Query { name: param }, Some(q)) = (&connector.auth, query) {
        if crate::proxy::canonical::query_has_param(q, param) {
            return Verdict::BadInput(format!(
                "the query carries `{param}`, the parameter the broker injects for connector {name}"
            ));
        }
    }
    match kill_switch_on(config, name) {
        Ok(false) => {}
        Ok(true) => {
            return Verdict::Deny(format!(
                "connector {name} is disabled (kill switch); POST /v1/enable turns it back on"
            ))
        }
        // Undecidable: the broker itself would refuse the call (503) while this holds.
        Err(e) => return Verdict::BadInput(format!("the kill switch cannot be read: {e}")),
    }
    if connector.is_expired(now) {
        return Verdict::Deny(format!(
            "connector {name} expired ({})",
            connector.expires_text
        ));
    }
    let mut reasons: Vec<String> = Vec::new();
    let found = connector.router.find(&method, upstream_path, |i| {
        let op = &connector.operations[i];
        if let (Some(allowed), Some(q)) = (&op.query, query) {
            if let Some(bad) =
                crate::proxy::canonical::query_names(q).find(|n| !allowed.iter().any(|a| a == n))
            {
                reasons.push(format!(
                    "operation {} matches but does not allow query parameter `{bad}`",
                    op.name
                ));
                return false;
            }
        }
        if !client.is_granted(&connector.name, &op.name, now) {
            reasons.push(format!(
                "operation {} matches but is not granted to {client_id} (or its grant expired)",
                op.name
            ));
            return false;
        }
        true
    });
    match found {
        Some(i) => Verdict::Allow {
            connector: connector.name.clone(),
            operation: connector.operations[i].name.clone(),
        },
        None if reasons.is_empty() => Verdict::Deny(format!(
            "no operation of connector {name} allows {method} {upstream_path}"
        )),
        None => Verdict::Deny(reasons.join("; ")),
    }
}

/// Whether the connector's kill switch is on: in the state directory beside the config, or
/// in the shared Redis state.
fn kill_switch_on(config: &Config, name: &str) -> Result<bool, crate::state::StateError> {
    match &config.state.backend {
        // A missing state file is "nothing revoked"; one that cannot be read or parsed is
        // undecidable (`serve` refuses to start on it), not "no kill switch".
        crate::config::StateBackend::Memory => {
            Ok(crate::state::Revocations::load(&config.state.dir)?.is_disabled(name))
        }
        crate::config::StateBackend::Redis { url, .. } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| crate::state::StateError::Unavailable(e.to_string()))?;
            rt.block_on(async {
                let dir = &config.state.dir;
                let replica = config.state.replica.as_deref();
                crate::state::RedisState::open(url, dir, replica, 0)?
                    .is_disabled(name)
                    .await
            })
        }
    }
}
