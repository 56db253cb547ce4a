//! placeholder
pub mod keygen_certs;
