//! End-to-end tests: one binary, real sockets on loopback, the broker in process.

mod support;

mod admin;
mod audit_log;
mod cli;
mod injection;
mod proxy;
mod token_endpoint;
