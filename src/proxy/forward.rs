//! Upstream connections: pooled keep-alive clients over HTTPS (rustls, webpki roots plus an
//! optional `upstream_ca`) or plain HTTP for loopback upstreams. Redirects are never followed
//! and nothing is retried: the legacy client does neither unless asked.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::ProxyBody;

/// A pooled client; cheap to clone (the pool is shared).
pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, ProxyBody>;

/// One pooled client per worker runtime ([`crate::workers`]): a pooled connection is driven
/// by a task on the runtime that opened it, so each worker keeps its own pool and a call never
/// hops threads to reach its upstream connection. Cheap to clone. (A dynamic connector's
/// token requests use the client of the worker that built the config; they are rare.)
#[derive(Clone)]
pub struct WorkerClients(Arc<[UpstreamClient]>);

impl WorkerClients {
    /// The client of the worker running on this thread.
    pub fn here(&self) -> &UpstreamClient {
        &self.0[crate::workers::current().unwrap_or(0) % self.0.len()]
    }
}

/// Idle upstream connections are kept this long for reuse.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// At most this many idle connections per upstream host and worker (so at most this many
/// times the number of cores per host in all).
const POOL_MAX_IDLE_PER_HOST: usize = 512;
/// TCP connect budget; the whole exchange is bounded by `upstream_timeout` as well.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One client per distinct trust configuration, shared across reloads so pools survive them.
#[derive(Default)]
pub struct UpstreamClients {
    by_ca: Mutex<HashMap<Option<PathBuf>, WorkerClients>>,
}

impl UpstreamClients {
    /// The clients for connectors trusting webpki roots plus `extra_ca`.
    pub fn get(&self, extra_ca: Option<&Path>) -> Result<WorkerClients, String> {
        let key = extra_ca.map(Path::to_path_buf);
        let mut map = self.by_ca.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(&key) {
            // A changed CA file is picked up by a reload only when the path changes; rebuild
            // every time instead would drop every pooled connection on each reload.
            return Ok(c.clone());
        }
        let clients = (0..crate::workers::count())
            .map(|_| build_client(extra_ca))
            .collect::<Result<Arc<[_]>, _>>()?;
        let clients = WorkerClients(clients);
        map.insert(key, clients.clone());
        Ok(clients)
    }
}

fn build_client(extra_ca: Option<&Path>) -> Result<UpstreamClient, String> {
    let mut tls = crate::tls::upstream_client_config(extra_ca).map_err(|e| e.to_string())?;
    // hyper-rustls sets ALPN itself from enable_http1/enable_http2 and refuses a preset list.
    tls.alpn_protocols.clear();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector))
}
