//! End-to-end tests: one binary, real sockets on loopback, the broker in process.

mod support;

mod admin;
mod attacks;
mod audit_log;
mod cli;
mod dynamic_credentials;
mod injection;
mod ops;
mod proxy;
mod secrets;
mod shared_state;
mod tls;
mod token_endpoint;
