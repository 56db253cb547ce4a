//! credbroker — a credential brokering proxy.
//!
//! Integrations get short-lived tokens scoped to named operations, send their API calls
//! through the broker, and the broker checks each call against the connector's allowlist
//! as configured now, injects the real credential, forwards the call and audits every use.
//! `../shared/DESIGN.md` is the contract; the modules follow its parts:
//!
//! - [`config`]: the TOML file (§3), parsed into validated types, and `check`'s lint.
//! - [`secret`]: the secret newtype and `env:`/`file:`/`literal:` references.
//! - [`credential`]: dynamic upstream credentials — OAuth2 client credentials, GitHub App (§3.7).
//! - [`policy`]: path patterns and the per-connector operation router (§3.1, §3.2).
//! - [`token`]: signing keys, JWKS, issuing and verifying access tokens (§4.1, §4.2).
//! - [`proxy`]: the request pipeline of §4.3, credential injection and forwarding.
//! - [`audit`]: the hash-chained JSON-lines audit log and the auditor tools (§5, §6).
//! - [`admin`]: the admin listener (§4.4).
//! - [`tls`]: TLS, mTLS and development certificates.
//! - [`server`]: listeners, reload, shutdown; [`workers`]: one runtime per core;
//!   [`cli`]: one file per command.

pub mod admin;
pub mod audit;
pub mod broker;
pub mod cli;
pub mod config;
pub mod credential;
pub mod dev;
pub mod policy;
pub mod proxy;
pub mod secret;
pub mod server;
pub mod state;
pub mod tls;
pub mod token;
pub mod workers;

/// A hash map for tables built from the config and only looked up with request data
/// (connectors, clients, routes, upstream pools): foldhash, randomly seeded, instead of
/// SipHash, whose cost showed in every call's profile (9 lookups a call). A request can add no
/// key to them, so there is no flooding to resist; maps filled from requests keep std's.
pub type ConfigMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
