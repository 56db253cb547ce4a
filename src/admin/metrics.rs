//! `GET /metrics` (DESIGN §4.4): the broker's counters and histograms in the OpenMetrics text
//! format, which Prometheus scrapes natively, built with `prometheus-client`.
//!
//! Label values are always bounded: a connector is labelled only when the config in force
//! names it, an operation only once it matched one of the connector's operations, a client only
//! once it authenticated, and a reason is one of the broker's fixed reason codes. Anything a
//! caller could make up (an unknown connector in the path, a client id that failed to
//! authenticate) is folded into the empty value, so a scan cannot grow the series count.

use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use prometheus_client::encoding::{EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::audit::{AuditLog, Record};
use crate::broker::Broker;
use crate::config::{Config, Connector};

/// The `Content-Type` of the exposition (OpenMetrics 1.0 text, which Prometheus accepts).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The classic Prometheus text format, for scrapers that do not ask for OpenMetrics.
pub const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether an `Accept` header prefers OpenMetrics (as Prometheus itself asks): it must be
/// named, with a `q` above 0 and at least the classic text format's — whose `q` is that of
/// `text/plain`, else `text/*`, else `*/*` (the most specific range that names it, RFC 9110
/// §12.5.1). Anything else — no header, `*/*`, `text/plain` — gets the classic text format.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    let Some(accept) = accept else {
        return false;
    };
    let mut openmetrics: Option<f32> = None;
    // The text format's `q` from `text/plain`, `text/*` and `*/*`, most specific first.
    let mut text: [Option<f32>; 3] = [None; 3];
    for range in accept.split(',') {
        let mut params = range.split(';');
        let media = params.next().unwrap_or("").trim().to_ascii_lowercase();
        // An unreadable `q` counts as 0: "not this one" is the safe reading.
        let q = params
            .find_map(|p| p.trim().strip_prefix("q="))
            .map_or(1.0, |q| q.trim().parse::<f32>().unwrap_or(0.0));
        let slot = match media.as_str() {
            "application/openmetrics-text" => &mut openmetrics,
            "text/plain" => &mut text[0],
            "text/*" => &mut text[1],
            "*/*" => &mut text[2],
            _ => continue,
        };
        *slot = Some(slot.map_or(q, |had: f32| had.max(q)));
    }
    let text = text.into_iter().flatten().next().unwrap_or(0.0);
    openmetrics.is_some_and(|q| q > 0.0 && q >= text)
}

/// OpenMetrics text as the classic Prometheus text format (0.0.4): a counter family is named
/// like its `_total` samples (in OpenMetrics it is named without the suffix), and the `# UNIT`
/// and `# EOF` lines, which 0.0.4 does not have, go. Everything else is the same.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                out.push(' ');
                out.push_str(tail);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// A label set given as (name, value) pairs; a `None` value leaves the label out, so an
/// allowed request carries no empty `reason`.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Labels(Vec<(&'static str, Option<String>)>);

impl EncodeLabelSet for Labels {
    fn encode(&self, encoder: LabelSetEncoder) -> Result<(), std::fmt::Error> {
        let present: Vec<(&str, String)> = self
            .0
            .iter()
            .filter_map(|(k, v)| v.as_deref().map(|v| (*k, escape_label_value(v))))
            .collect();
        let present: Vec<(&str, &str)> = present.iter().map(|(k, v)| (*k, v.as_str())).collect();
        EncodeLabelSet::encode(&present.as_slice(), encoder)
    }
}

/// A label value as the text format wants it (`\`, `\"` and `\n` escaped). prometheus-client
/// 0.23 writes values as they are, and operation names and client ids come from the config:
/// one `"` or newline in them would make every scrape unparsable.
fn escape_label_value(v: &str) -> String {
    if !v.contains(['\\', '"', '\n']) {
        return v.to_owned();
    }
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    Labels(
        pairs
            .iter()
            .map(|(k, v)| (*k, Some((*v).to_owned())))
            .collect(),
    )
}

type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// Latency buckets from 1 ms to about 33 s (a doubling per bucket): proxied calls are bounded
/// by `request_timeout` (60 s by default), so the top buckets still separate slow from stuck.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Audit syncs are much shorter: 50 µs to about 1.6 s.
fn fsync_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// Usage of one connector, for `GET /v1/connectors`.
#[derive(Debug, Default)]
struct Usage {
    allowed: AtomicU64,
    denied: AtomicU64,
    /// Unix seconds of the last allowed call (0: never).
    last_allowed: AtomicI64,
}

/// One connector's series for the hot path (see [`Metrics::for_connector`]).
pub struct ConnectorMetrics {
    /// `credbroker_proxy_requests_total{decision="allow"}`, by operation index.
    allowed: Vec<Counter>,
    request_duration: Histogram,
    upstream_duration: Histogram,
    usage: Arc<Usage>,
}

impl ConnectorMetrics {
    /// An allowed call of the connector's operation number `operation` (its allow record is
    /// written; it is about to be forwarded).
    pub fn allowed(&self, operation: usize) {
        if let Some(c) = self.allowed.get(operation) {
            c.inc();
        }
        self.usage.allowed.fetch_add(1, Ordering::Relaxed);
        // Unix seconds straight from the system clock (no calendar arithmetic); the latest
        // wins, whichever call stores last.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.usage.last_allowed.fetch_max(now, Ordering::Relaxed);
    }

    /// The whole request is over (its response body ended, or it failed).
    pub fn request_done(&self, took: Duration) {
        self.request_duration.observe(took.as_secs_f64());
    }

    /// The upstream answered (headers received) after `took`.
    pub fn upstream_ok(&self, took: Duration) {
        self.upstream_duration.observe(took.as_secs_f64());
    }
}

/// The registry and every family the broker updates. Held by [`Broker`]; the update methods
/// are the one-line hooks the pipeline, the token endpoint and reload call.
pub struct Metrics {
    registry: Registry,
    proxy_requests: Family<Labels, Counter>,
    request_duration: HistogramFamily,
    upstream_duration: HistogramFamily,
    upstream_errors: Family<Labels, Counter>,
    tokens_issued: Family<Labels, Counter>,
    tokens_denied: Family<Labels, Counter>,
    reloads: Family<Labels, Counter>,
    audit_records: Counter,
    audit_write_errors: Counter,
    audit_rotations: Counter,
    audit_fsync: Histogram,
    connector_expiry: Family<Labels, Gauge>,
    connector_enabled: Family<Labels, Gauge>,
    credential_mints: Family<Labels, Counter>,
    credential_expiry: Family<Labels, Gauge>,
    connections_open: Family<Labels, Gauge>,
    connections_limit: Family<Labels, Gauge>,
    requests_overloaded: Family<Labels, Counter>,
    tls_handshake_failures: Family<Labels, Counter>,
    admin_denied: Family<Labels, Counter>,
    state_deferred: Gauge,
    usage: DashMap<String, Arc<Usage>>,
}

/// One listener's connection figures (see [`Metrics::listener`]): handles on the families'
/// series, updated once per connection, not per call.
#[derive(Clone, Default)]
pub struct ListenerMetrics {
    open: Gauge,
    overloaded: Counter,
    /// TLS handshakes that failed, by [`HandshakeFailure`].
    handshake_failures: [Counter; 3],
}

/// Why a TLS handshake failed, as `credbroker_tls_handshake_failures_total` counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The client's certificate was refused (expired, not from `client_ca`, unfit for
    /// client authentication): an mTLS client locked out, or someone trying certificates.
    ClientCertificate,
    /// Not finished within `header_read_timeout`.
    Timeout,
    /// Anything else (no common protocol version or cipher, not TLS at all, a reset).
    Other,
}

impl HandshakeFailure {
    const ALL: [Self; 3] = [Self::ClientCertificate, Self::Timeout, Self::Other];

    fn label(self) -> &'static str {
        match self {
            Self::ClientCertificate => "client_certificate",
            Self::Timeout => "timeout",
            Self::Other => "other",
        }
    }
}

impl ListenerMetrics {
    /// Counts a connection as open until the returned guard is dropped.
    pub fn connection_opened(&self) -> OpenConnection {
        self.open.inc();
        OpenConnection(self.open.clone())
    }

    /// An HTTP/2 request refused 503 `overloaded` (every place in flight was taken).
    pub fn overloaded(&self) {
        self.overloaded.inc();
    }

    /// A TLS handshake that failed.
    pub fn handshake_failed(&self, why: HandshakeFailure) {
        self.handshake_failures[why as usize].inc();
    }
}

/// An open connection, counted in `credbroker_connections_open` while it lives.
pub struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every family.
    pub fn new() -> Self {
        let mut m = Self {
            registry: Registry::default(),
            proxy_requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            upstream_duration: Family::new_with_constructor(latency_histogram),
            upstream_errors: Family::default(),
            tokens_issued: Family::default(),
            tokens_denied: Family::default(),
            reloads: Family::default(),
            audit_records: Counter::default(),
            audit_write_errors: Counter::default(),
            audit_rotations: Counter::default(),
            audit_fsync: fsync_histogram(),
            connector_expiry: Family::default(),
            connector_enabled: Family::default(),
            credential_mints: Family::default(),
            credential_expiry: Family::default(),
            connections_open: Family::default(),
            connections_limit: Family::default(),
            requests_overloaded: Family::default(),
            tls_handshake_failures: Family::default(),
            admin_denied: Family::default(),
            state_deferred: Gauge::default(),
            usage: DashMap::new(),
        };
        m.register();
        m
    }

    fn register(&mut self) {
        let r = &mut self.registry;
        r.register(
            "credbroker_state_deferred_changes",
            "Revocations and kill switches this replica keeps because Redis could not take \
             them, not made there yet (always 0 with the memory backend)",
            self.state_deferred.clone(),
        );
        r.register(
            "credbroker_admin_requests_denied",
            "Admin API requests refused for a missing or wrong admin token (reason \
             missing_token or wrong_token), reads included (refused changes are also audited \
             `denied`)",
            self.admin_denied.clone(),
        );
        r.register(
            "credbroker_proxy_requests",
            "Proxied calls by connector, operation and decision; denials carry their reason code",
            self.proxy_requests.clone(),
        );
        r.register_with_unit(
            "credbroker_proxy_request_duration",
            "Whole proxied request, from receipt to the end of the response body",
            Unit::Seconds,
            self.request_duration.clone(),
        );
        r.register_with_unit(
            "credbroker_upstream_duration",
            "Time from forwarding to the upstream's response headers",
            Unit::Seconds,
            self.upstream_duration.clone(),
        );
        r.register(
            "credbroker_upstream_errors",
            "Upstream failures by connector and kind (connect, failed, timeout)",
            self.upstream_errors.clone(),
        );
        r.register(
            "credbroker_tokens_issued",
            "Access tokens issued, by client",
            self.tokens_issued.clone(),
        );
        r.register(
            "credbroker_tokens_denied",
            "Token requests refused, by client (empty when unauthenticated) and error code",
            self.tokens_denied.clone(),
        );
        r.register(
            "credbroker_config_reloads",
            "Config reload attempts by result (ok, failed)",
            self.reloads.clone(),
        );
        r.register(
            "credbroker_audit_records",
            "Audit records written",
            self.audit_records.clone(),
        );
        r.register(
            "credbroker_audit_write_errors",
            "Failed audit batch writes or syncs (the calls in them were refused)",
            self.audit_write_errors.clone(),
        );
        r.register(
            "credbroker_audit_rotations",
            "Audit log rotations",
            self.audit_rotations.clone(),
        );
        r.register_with_unit(
            "credbroker_audit_fsync_duration",
            "Duration of each audit log fdatasync",
            Unit::Seconds,
            self.audit_fsync.clone(),
        );
        r.register_with_unit(
            "credbroker_connector_expiry_timestamp",
            "When each connector expires (Unix time); it refuses every call from then on",
            Unit::Seconds,
            self.connector_expiry.clone(),
        );
        r.register(
            "credbroker_connector_enabled",
            "1 when the connector is enabled, 0 while its kill switch is on",
            self.connector_enabled.clone(),
        );
        r.register(
            "credbroker_credential_mints",
            "Dynamic upstream credentials minted, by connector and kind (resets when a reload replaces the credential)",
            self.credential_mints.clone(),
        );
        r.register_with_unit(
            "credbroker_credential_expiry_timestamp",
            "When each connector's cached dynamic credential expires (Unix time)",
            Unit::Seconds,
            self.credential_expiry.clone(),
        );
        r.register(
            "credbroker_connections_open",
            "Client connections open, by listener (proxy, admin)",
            self.connections_open.clone(),
        );
        r.register(
            "credbroker_connections_limit",
            "The most client connections a listener holds open (server.max_connections); at \
             the limit it stops accepting until one closes",
            self.connections_limit.clone(),
        );
        r.register(
            "credbroker_requests_overloaded",
            "HTTP/2 requests refused 503 overloaded, by listener: the listener's requests in \
             flight were at max_connections (neither read nor audited)",
            self.requests_overloaded.clone(),
        );
        r.register(
            "credbroker_tls_handshake_failures",
            "TLS handshakes that failed, by listener and reason (client_certificate: the \
             client's certificate was refused; timeout; other); neither read nor audited",
            self.tls_handshake_failures.clone(),
        );
    }

    /// The series of listener `name` (`proxy`, `admin`), whose connection limit is `limit`.
    pub fn listener(&self, name: &str, limit: usize) -> ListenerMetrics {
        let set = labels(&[("listener", name)]);
        self.connections_limit
            .get_or_create(&set)
            .set(i64::try_from(limit).unwrap_or(i64::MAX));
        let failures = HandshakeFailure::ALL.map(|why| {
            let set = labels(&[("listener", name), ("reason", why.label())]);
            self.tls_handshake_failures.get_or_create(&set).clone()
        });
        ListenerMetrics {
            open: self.connections_open.get_or_create(&set).clone(),
            overloaded: self.requests_overloaded.get_or_create(&set).clone(),
            handshake_failures: failures,
        }
    }

    /// Feeds each audit sync's duration into the fsync histogram.
    pub fn observe_audit(&self, audit: &AuditLog) {
        let fsync = self.audit_fsync.clone();
        audit.set_fsync_observer(std::sync::Arc::new(move |d: Duration| {
            fsync.observe(d.as_secs_f64());
        }));
    }

    /// A refused proxy call: counted with its reason, and its duration observed. `connector`
    /// and `operation` are labels only when `config` knows them (see the module note).
    pub fn proxy_denied(
        &self,
        config: &Config,
        record: &Record,
        reason: &'static str,
        took: Duration,
    ) {
        let connector = record.connector.as_deref();
        let connector = connector.filter(|c| config.connector(c).is_some());
        let operation = record.operation.as_deref().filter(|_| connector.is_some());
        self.count_request(connector, operation, Some(reason));
        self.request_done(connector.unwrap_or_default(), took);
    }

    /// A proxy call whose allow record is durable (it is about to be forwarded).
    pub fn proxy_allowed(&self, connector: &str, operation: &str) {
        self.count_request(Some(connector), Some(operation), None);
    }

    /// Resolves one connector's series once per config load, so an allowed call only bumps
    /// atomics instead of building label sets and hashing them three times.
    pub fn for_connector(&self, connector: &Connector) -> Arc<ConnectorMetrics> {
        let allowed = connector
            .operations
            .iter()
            .map(|op| {
                let set = Labels(vec![
                    ("connector", Some(connector.name.clone())),
                    ("operation", Some(op.name.clone())),
                    ("decision", Some("allow".to_owned())),
                    ("reason", None),
                ]);
                self.proxy_requests.get_or_create(&set).clone()
            })
            .collect();
        let set = labels(&[("connector", &connector.name)]);
        Arc::new(ConnectorMetrics {
            allowed,
            request_duration: self.request_duration.get_or_create(&set).clone(),
            upstream_duration: self.upstream_duration.get_or_create(&set).clone(),
            usage: Arc::clone(&self.usage.entry(connector.name.clone()).or_default()),
        })
    }

    fn count_request(
        &self,
        connector: Option<&str>,
        operation: Option<&str>,
        deny_reason: Option<&'static str>,
    ) {
        let decision = if deny_reason.is_some() {
            "deny"
        } else {
            "allow"
        };
        let set = Labels(vec![
            ("connector", Some(connector.unwrap_or_default().to_owned())),
            ("operation", Some(operation.unwrap_or_default().to_owned())),
            ("decision", Some(decision.to_owned())),
            ("reason", deny_reason.map(str::to_owned)),
        ]);
        self.proxy_requests.get_or_create(&set).inc();
        let Some(c) = connector else { return };
        let usage = self.usage.entry(c.to_owned()).or_default();
        if deny_reason.is_some() {
            usage.denied.fetch_add(1, Ordering::Relaxed);
        } else {
            usage.allowed.fetch_add(1, Ordering::Relaxed);
            usage
                .last_allowed
                .store(chrono::Utc::now().timestamp(), Ordering::Relaxed);
        }
    }

    /// A proxied request is over: denied, failed upstream, or its response body ended.
    /// `connector` is a configured connector's name (or empty).
    pub fn request_done(&self, connector: &str, took: Duration) {
        self.request_duration
            .get_or_create(&labels(&[("connector", connector)]))
            .observe(took.as_secs_f64());
    }

    /// The wait for the upstream's response headers ended: an answer, a failure (`connect`
    /// or `failed`) or a `timeout` (`Err(())`). Only called for connectors of the config in
    /// force.
    pub fn upstream_result<T>(
        &self,
        connector: &str,
        took: Duration,
        result: &Result<Result<T, crate::proxy::forward::UpstreamError>, ()>,
    ) {
        let kind = match result {
            Ok(Ok(_)) => None,
            Ok(Err(e)) if e.is_connect() => Some("connect"),
            Ok(Err(_)) => Some("failed"),
            Err(_) => Some("timeout"),
        };
        self.upstream_done(connector, took, kind);
    }

    /// The upstream answered, but with what cannot be relayed (a transfer coding other than
    /// chunked, an unasked protocol switch): a 502 like any `failed` exchange.
    pub fn upstream_unusable(&self, connector: &str) {
        self.upstream_done(connector, Duration::ZERO, Some("failed"));
    }

    fn upstream_done(&self, connector: &str, took: Duration, error: Option<&'static str>) {
        let set = labels(&[("connector", connector)]);
        match error {
            None => self
                .upstream_duration
                .get_or_create(&set)
                .observe(took.as_secs_f64()),
            Some(kind) => {
                self.upstream_errors
                    .get_or_create(&labels(&[("connector", connector), ("kind", kind)]))
                    .inc();
            }
        }
    }

    /// A token request's outcome; `client` is set only once the client authenticated.
    pub fn token(&self, client: Option<&str>, denied: Option<&'static str>) {
        let client = client.unwrap_or_default();
        match denied {
            None => self
                .tokens_issued
                .get_or_create(&labels(&[("client", client)]))
                .inc(),
            Some(code) => self
                .tokens_denied
                .get_or_create(&labels(&[("client", client), ("reason", code)]))
                .inc(),
        };
    }

    /// An admin request without the right admin token: a guess at the token through a read
    /// leaves no audit record, so it is counted; `presented` tells a guess (a token that is
    /// not the admin's) from a probe that sent none.
    pub fn admin_denied(&self, presented: bool) {
        let reason = if presented {
            "wrong_token"
        } else {
            "missing_token"
        };
        self.admin_denied
            .get_or_create(&labels(&[("reason", reason)]))
            .inc();
    }

    /// A reload attempt (any trigger).
    pub fn reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.reloads
            .get_or_create(&labels(&[("result", result)]))
            .inc();
    }

    /// `{allowed, denied, last_allowed}` of one connector since start, for the connector view.
    pub fn usage(&self, connector: &str) -> serde_json::Value {
        let Some(u) = self.usage.get(connector) else {
            return serde_json::json!({"allowed": 0, "denied": 0, "last_allowed": null});
        };
        let last = u.last_allowed.load(Ordering::Relaxed);
        serde_json::json!({
            "allowed": u.allowed.load(Ordering::Relaxed),
            "denied": u.denied.load(Ordering::Relaxed),
            "last_allowed": (last > 0)
                .then(|| chrono::DateTime::from_timestamp(last, 0).map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)))
                .flatten(),
        })
    }

    /// The exposition, after refreshing what is read at scrape time: the audit writer's
    /// counters and, from the config in force, each connector's expiry and enabled state
    /// (cleared first, so a connector removed by a reload disappears).
    /// `disabled`: the connectors switched off, `None` when unknown (the shared state did not
    /// answer); the `enabled` gauge is then left out rather than guessed.
    pub fn render(&self, broker: &Broker, disabled: Option<&HashSet<String>>) -> String {
        let stats = broker.audit.stats();
        // The writer's counters only grow; mirroring them keeps one source of truth.
        self.audit_records
            .inner()
            .store(stats.written, Ordering::Relaxed);
        self.audit_write_errors
            .inner()
            .store(stats.write_errors, Ordering::Relaxed);
        self.audit_rotations
            .inner()
            .store(stats.rotations, Ordering::Relaxed);
        self.state_deferred
            .set(i64::try_from(broker.state.deferred_count()).unwrap_or(i64::MAX));
        let live = broker.live();
        self.connector_expiry.clear();
        self.connector_enabled.clear();
        for c in &live.config.connectors {
            let set = labels(&[("connector", &c.name)]);
            self.connector_expiry
                .get_or_create(&set)
                .set(c.expires_at.timestamp());
            if let Some(disabled) = disabled {
                let enabled = i64::from(!disabled.contains(&c.name));
                self.connector_enabled.get_or_create(&set).set(enabled);
            }
        }
        self.credential_mints.clear();
        self.credential_expiry.clear();
        for (name, runtime) in &live.connectors {
            let Some(dynamic) = &runtime.dynamic else {
                continue;
            };
            let set = labels(&[("connector", name), ("kind", dynamic.kind().as_str())]);
            self.credential_mints
                .get_or_create(&set)
                .inner()
                .store(dynamic.mints(), Ordering::Relaxed);
            if let Some(t) = dynamic.expires_at() {
                let set = labels(&[("connector", name)]);
                self.credential_expiry
                    .get_or_create(&set)
                    .set(t.timestamp());
            }
        }
        let mut out = String::new();
        // Writing into a String cannot fail; an error here would be a bug in the encoder.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_only_when_asked_for() {
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        )));
        assert!(!wants_openmetrics(None));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(Some("text/plain;version=0.0.4")));
        assert!(!wants_openmetrics(Some(
            "application/openmetrics-text;q=0, text/plain"
        )));
        // The `q` preferences decide, the most specific range for the text format counting.
        assert!(!wants_openmetrics(Some(
            "text/plain;q=1, application/openmetrics-text;q=0.1"
        )));
        assert!(wants_openmetrics(Some(
            "*/*;q=1, text/plain;q=0.1, application/openmetrics-text;q=0.5"
        )));
        assert!(!wants_openmetrics(Some(
            "application/openmetrics-text;q=0.2, text/*;q=0.3"
        )));
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;q=0.2"
        )));
        assert!(!wants_openmetrics(Some("application/openmetrics-text;q=x")));
    }

    fn config() -> Config {
        let text = r#"
[server]
listen = "127.0.0.1:0"
[audit]
path = "audit.jsonl"
[[connectors]]
name = "github"
owner = "o"
purpose = "p"
expires = "2099-12-31"
upstream = "http://127.0.0.1:9"
credential = "literal:x"
  [[connectors.operations]]
  name = "issues.read"
  method = "GET"
  path = "/issues"
"#;
        Config::parse(text, std::path::Path::new("t.toml")).unwrap()
    }

    fn encode(m: &Metrics) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry).unwrap();
        out
    }

    #[test]
    fn made_up_connectors_and_operations_do_not_become_labels() {
        let m = Metrics::new();
        let c = config();
        m.proxy_allowed("github", "issues.read");
        let mut record = Record::new(crate::audit::Event::Proxy);
        record.connector = Some("attacker-chosen".into());
        record.operation = Some("x".into());
        m.proxy_denied(&c, &record, "unknown_connector", Duration::from_millis(1));
        let text = encode(&m);
        assert!(text.contains(
            "credbroker_proxy_requests_total{connector=\"github\",operation=\"issues.read\",decision=\"allow\"} 1"
        ), "{text}");
        assert!(text.contains(
            "credbroker_proxy_requests_total{connector=\"\",operation=\"\",decision=\"deny\",reason=\"unknown_connector\"} 1"
        ), "{text}");
        assert!(!text.contains("attacker-chosen"));
        assert_eq!(m.usage("github")["allowed"], 1);
        assert!(m.usage("attacker-chosen")["allowed"] == 0);
    }

    #[test]
    fn label_values_from_the_config_are_escaped() {
        let m = Metrics::new();
        m.token(Some("a\"b\\c\nd"), None);
        let text = encode(&m);
        assert!(text.contains(r#"client="a\"b\\c\nd""#), "{text}");
        assert!(!text.contains("a\"b"), "{text}");
    }

    #[test]
    fn names_follow_the_conventions() {
        let m = Metrics::new();
        m.token(Some("bot"), None);
        m.token(None, Some("invalid_client"));
        m.reload(false);
        m.upstream_done("github", Duration::from_millis(3), None);
        m.upstream_done("github", Duration::from_millis(3), Some("timeout"));
        let text = encode(&m);
        let classic = to_prometheus_text(&text);
        assert!(classic.contains("# TYPE credbroker_tokens_issued_total counter\n"));
        assert!(classic.contains("# HELP credbroker_tokens_issued_total "));
        assert!(classic.contains("credbroker_tokens_issued_total{client=\"bot\"} 1\n"));
        assert!(classic.contains("# TYPE credbroker_audit_fsync_duration_seconds histogram\n"));
        assert!(!classic.contains("# EOF") && !classic.contains("# UNIT"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("credbroker_"), "{line}");
        }
        assert!(text.contains("credbroker_tokens_issued_total{client=\"bot\"} 1"));
        assert!(text
            .contains("credbroker_tokens_denied_total{client=\"\",reason=\"invalid_client\"} 1"));
        assert!(text.contains("credbroker_config_reloads_total{result=\"failed\"} 1"));
        assert!(text.contains("credbroker_upstream_duration_seconds_count{connector=\"github\"} 1"));
        assert!(text
            .contains("credbroker_upstream_errors_total{connector=\"github\",kind=\"timeout\"} 1"));
        assert!(text.contains("# TYPE credbroker_audit_fsync_duration_seconds histogram"));
        assert!(text.ends_with("# EOF\n"));
    }
}
