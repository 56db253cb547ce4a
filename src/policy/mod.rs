//! Connector policy (DESIGN §3.1, §3.2): operation path patterns and the per-connector router
//! that finds, most specific first, the operations a call matches. Only allowlisting exists:
//! a call no operation matches is refused, so case and encoding variants fail closed.

pub mod pattern;
pub mod router;

pub use pattern::{Pattern, PatternError, Segment};
pub use router::OperationRouter;
