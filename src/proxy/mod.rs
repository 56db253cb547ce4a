//! placeholder
pub mod canonical;
