//! The crate's error type: what `serve` and the per-connection tasks can
//! fail with. Protocol errors of one connection end that connection only;
//! they are logged where handled and never reach `serve`'s caller.

use crate::wire::WireError;

#[derive(Debug, thiserror::Error)]
pub enum IscsiError {
    #[error("accepting connections failed: {0}")]
    Accept(#[source] std::io::Error),
    #[error("framing error: {0}")]
    Wire(#[from] WireError),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("login failed: {0}")]
    Login(String),
    #[error("timed out waiting for the initiator: {0}")]
    Timeout(&'static str),
    #[error("reservation store error: {0}")]
    Reservations(String),
}
